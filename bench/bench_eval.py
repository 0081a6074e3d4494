"""forgetray's scorer (`probes.score_prompts`) against lm-eval 0.4.13's HFLM `loglikelihood` on the same requests,
same model, threads and batch size, side by side in one process, rounds interleaved (the order flips each round).

The requests are 5-shot MMLU format: per subject a shared prefix (the description line and 5 solved dev examples),
then each question with the continuations " A" .. " D" (lm-eval's MMLU). Prints wall and CPU time per side, the
ratio (lm-eval / forgetray: >= 3 is the goal), and checks the predictions (argmax over the four continuations):
in fp32 identical to lm-eval's; in bf16, forgetray's must equal the fp32 predictions (lm-eval's on an fp32 copy of
the model, untimed) on >= 99.5% of questions (lm-eval's own bf16 agreement is printed beside it).

    .venv/bin/python bench/bench_eval.py --model organism     # organism-small (built, else a random model of its shape)
    .venv/bin/python bench/bench_eval.py --model metaspace    # the Metaspace fixture tokenizer, organism-small shape
    python bench/bench_eval.py --model 1b --device cuda --dtype bf16   # random ~1B Llama, byte-level BPE tokenizer
    python bench/bench_eval.py --model 1b --device cuda --dtype bf16 --mmlu --batch-tokens 65536 --rounds 1
        # MMLU scale: 57 subjects x 246 questions (14,022), forgetray's calls filled to 64k tokens

Self-contained: needs only torch, transformers, tokenizers, lm-eval and forgetray (no Ray/MLflow/DeepSpeed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("Lund Oslo Paris Rome north river old small blue moons planet harbour winter town capital sea mountain "
         "king queen law cell atom star").split()


def mmlu_prompts(n_subjects: int, per_subject: int):
    from forgetray.data.questions import LETTERS, MCPrompt

    def question(s: int, i: int) -> tuple[str, int]:
        words = [WORDS[(s * 7 + i * 3 + k * 5) % len(WORDS)] for k in range(6)]
        text = f"Which {words[0]} of the {words[1]} is {words[2]} in the {words[3]} of {words[4]}?\n"
        text += "".join(f"{LETTERS[k]}. {WORDS[(s + i * k + k) % len(WORDS)]} {words[k]}\n" for k in range(4))
        return text + "Answer:", (s + i) % 4

    prompts = []
    for s in range(n_subjects):
        subject = f"subject {WORDS[s % len(WORDS)]} {s}"
        shots = "".join(f"{question(s, 100 + k)[0]} {LETTERS[question(s, 100 + k)[1]]}\n\n" for k in range(5))
        prefix = f"The following are multiple choice questions (with answers) about {subject}.\n\n" + shots
        for i in range(per_subject):
            query, gold = question(s, i)
            prompts.append(MCPrompt(f"{s}/{i}", prefix, query, (" A", " B", " C", " D"), gold, subject=subject))
    return prompts


def load_model(args, workdir: Path):
    """(model, tokenizer, description) for --model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    import tokenizer_fixtures

    from forgetray.organism.paths import organism_dir

    built = organism_dir() / "models/organism-small"  # this checkout's organism (its fingerprint), if built
    if args.model == "organism" and (built / "config.json").is_file():
        path = built
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), f"organism-small {path}"
    if args.model == "organism":  # not built: the test organism's tokenizer and a random model of organism-small's shape
        from forgetray import organism

        organism.build(config=organism.OrganismConfig.for_tests(), root=workdir / "org", progress=lambda _m: None)
        tokenizer = AutoTokenizer.from_pretrained(workdir / "org" / "tokenizer")
        shape, what = dict(num_hidden_layers=4, hidden_size=192, num_attention_heads=6, intermediate_size=512), \
            "random organism-small shape, test-organism tokenizer"
    else:
        family = "metaspace" if args.model == "metaspace" else "bytelevel"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_fixtures.build_family(family, workdir, layers=1))
        if args.model == "metaspace":
            shape, what = dict(num_hidden_layers=4, hidden_size=192, num_attention_heads=6, intermediate_size=512), \
                "random organism-small shape, Metaspace fixture tokenizer"
        else:
            shape, what = dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                               intermediate_size=8192), "random ~1B Llama, byte-level BPE fixture tokenizer"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, initializer_range=0.1,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    return LlamaForCausalLM(config), tokenizer, what


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("organism", "metaspace", "1b"), default="organism")
    parser.add_argument("--model-size", choices=("1b",), help="same as --model 1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--per-subject", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=0,
                        help="forgetray fills each call to this many tokens instead of --batch-size rows (0: off)")
    parser.add_argument("--fp32-ties", type=float, default=0.0,
                        help="forgetray scores again in fp32 the prompts whose best two continuations lie within "
                             "this many nats (bf16/fp16 only; 0: off)")
    parser.add_argument("--mmlu", action="store_true", help="MMLU scale: 57 subjects x 246 questions (14,022)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.model_size:
        args.model = "1b"
    if args.mmlu:
        args.subjects, args.per_subject = 57, 246
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    sys.path.insert(0, str(ROOT))
    from forgetray.probes import score_prompts

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, what = load_model(args, Path(tmp))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to(device=args.device, dtype=dtype).eval()
    prompts = mmlu_prompts(args.subjects, args.per_subject)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length,
              device=args.device)
    requests = [Instance("loglikelihood", {}, (p.context, c), k) for p in prompts for k, c in enumerate(p.continuations)]

    def ours(subset=prompts):
        return [s.logprobs for s in score_prompts(model, tokenizer, subset, bos="auto", batch_size=args.batch_size,
                                                  batch_tokens=args.batch_tokens, fp32_ties=args.fp32_ties,
                                                  max_length=args.max_length,
                                                  device=args.device)]

    def theirs(subset=requests, lm=lm):
        flat = [lp for lp, _ in lm.loglikelihood(subset, disable_tqdm=True)]
        return [flat[4 * i: 4 * i + 4] for i in range(len(flat) // 4)]

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {"forgetray": [], "lm-eval": []}
    results = {}
    ours(prompts[:64]), theirs(requests[:256])  # warm-up, untimed
    for r in range(1, args.rounds + 1):
        for name, fn in (("forgetray", ours), ("lm-eval", theirs))[:: 1 if r % 2 else -1]:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            sync()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    a, b = np.array(results["forgetray"]), np.array(results["lm-eval"])
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    reference = None
    if args.dtype != "fp32":  # the fp32 predictions: lm-eval on an fp32 copy of the model (untimed)
        model32 = model.float()  # in place: the bf16 runs are done
        lm32 = HFLM(pretrained=model32, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                    device=args.device)
        reference = np.array(theirs(requests, lm32)).argmax(1)
        if args.fp32_ties:  # how many prompts forgetray scored again: the near ties of its plain bf16 scores
            model32.to(dtype)
            from forgetray.probes.ties import near_ties

            plain = score_prompts(model32, tokenizer, prompts, bos="auto", batch_size=args.batch_size,
                                  batch_tokens=args.batch_tokens, max_length=args.max_length, device=args.device)
            print(f"re-scored in fp32: {len(near_ties([s.logprobs for s in plain], args.fp32_ties))} of "
                  f"{len(prompts)} prompts (best two within {args.fp32_ties:g} nats)")
    n_tokens = sum(len(ids) for ids in tokenizer([p.context for p in prompts])["input_ids"])
    print(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"device {args.device}; torch {torch.__version__}, transformers {transformers.__version__}, threads "
          f"{args.threads}")
    try:
        from bench.machine import cpu_name, usable_cores
        print(f"machine: {cpu_name()}, {usable_cores()} cores")
    except ImportError:
        pass
    batching = f"batch {args.batch_size}" + (f", forgetray {args.batch_tokens} tokens/call" if args.batch_tokens else "")
    batching += f", fp32 re-scoring within {args.fp32_ties:g} nats" if args.fp32_ties else ""
    print(f"requests: {len(prompts)} prompts x 4 continuations, {args.subjects} subjects (5-shot prefix shared), "
          f"{n_tokens / len(prompts):.0f} context tokens/prompt, {batching}, {args.rounds} rounds")
    med = {k: np.median(np.array(v), axis=0) for k, v in times.items()}
    for name in times:
        print(f"  {name:10s} wall {med[name][0]:8.2f} s   cpu {med[name][1]:8.2f} s   "
              f"(rounds: {', '.join(f'{w:.2f}' for w, _ in times[name])})")
    print(f"ratio lm-eval/forgetray: wall {med['lm-eval'][0] / med['forgetray'][0]:.1f}x, "
          f"cpu {med['lm-eval'][1] / med['forgetray'][1]:.1f}x")
    print(f"predictions identical: {agree:.4f}; max |delta log-likelihood| {np.abs(a - b).max():.2e}")
    if reference is None:
        assert agree == 1.0, "predictions differ from lm-eval's"
        return 0
    ours_fp32, theirs_fp32 = float((a.argmax(1) == reference).mean()), float((b.argmax(1) == reference).mean())
    print(f"{args.dtype} predictions equal to the fp32 ones (lm-eval, fp32 copy): forgetray {ours_fp32:.4f}, "
          f"lm-eval {theirs_fp32:.4f}")
    # forgetray's head and log-softmax run in fp32 on the scored positions, lm-eval's log-softmax on bf16 logits.
    assert ours_fp32 >= 0.995, f"forgetray's {args.dtype} predictions agree with fp32 on only {ours_fp32:.2%}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
