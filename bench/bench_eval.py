"""forgetray's scorer (`probes.score_prompts`) against lm-eval 0.4.13's HFLM `loglikelihood` on the same requests,
same model, threads and batch size, side by side in one process, rounds interleaved (the order flips each round).

The requests are 5-shot MMLU format: per subject a shared prefix (the description line and 5 solved dev examples),
then each question with the continuations " A" .. " D" (lm-eval's MMLU). Prints wall and CPU time per side, the
ratio (lm-eval / forgetray: >= 3 is the goal), and checks the predictions (argmax over the four continuations) are
identical and the log-likelihoods close.

    .venv/bin/python bench/bench_eval.py --model organism     # organism-small (built, else a random model of its shape)
    .venv/bin/python bench/bench_eval.py --model metaspace    # the Metaspace fixture tokenizer, organism-small shape
    python bench/bench_eval.py --model 1b --device cuda --dtype bf16   # random ~1B Llama, byte-level BPE tokenizer

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
ORGANISM = Path.home() / ".cache/forgetray/organism/fb32aa40ae4cee8a"
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

    if args.model == "organism" and (ORGANISM / "models/organism-small/config.json").is_file():
        path = ORGANISM / "models/organism-small"
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
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.model_size:
        args.model = "1b"
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

    def ours():
        return [s.logprobs for s in score_prompts(model, tokenizer, prompts, bos="auto", batch_size=args.batch_size,
                                                  max_length=args.max_length, device=args.device)]

    def theirs():
        flat = [lp for lp, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        return [flat[4 * i: 4 * i + 4] for i in range(len(prompts))]

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {"forgetray": [], "lm-eval": []}
    results = {}
    for r in range(args.rounds + 1):  # round 0 warms up, untimed
        for name, fn in (("forgetray", ours), ("lm-eval", theirs))[:: 1 if r % 2 else -1]:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            sync()
            if r:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    a, b = np.array(results["forgetray"]), np.array(results["lm-eval"])
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    n_tokens = sum(len(ids) for ids in tokenizer([p.context for p in prompts])["input_ids"])
    print(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"device {args.device}; torch {torch.__version__}, transformers {transformers.__version__}, threads "
          f"{args.threads}")
    try:
        from bench.machine import cpu_name, usable_cores
        print(f"machine: {cpu_name()}, {usable_cores()} cores")
    except ImportError:
        pass
    print(f"requests: {len(prompts)} prompts x 4 continuations, {args.subjects} subjects (5-shot prefix shared), "
          f"{n_tokens / len(prompts):.0f} context tokens/prompt, batch {args.batch_size}, {args.rounds} rounds")
    med = {k: np.median(np.array(v), axis=0) for k, v in times.items()}
    for name in times:
        print(f"  {name:10s} wall {med[name][0]:8.2f} s   cpu {med[name][1]:8.2f} s   "
              f"(rounds: {', '.join(f'{w:.2f}' for w, _ in times[name])})")
    print(f"ratio lm-eval/forgetray: wall {med['lm-eval'][0] / med['forgetray'][0]:.1f}x, "
          f"cpu {med['lm-eval'][1] / med['forgetray'][1]:.1f}x")
    print(f"predictions identical: {agree:.4f}; max |delta log-likelihood| {np.abs(a - b).max():.2e}")
    if args.dtype == "fp32":
        assert agree == 1.0, "predictions differ from lm-eval's"
    else:  # bf16: lm-eval's log-softmax runs in bf16, forgetray's in fp32, so near-ties may flip
        assert agree >= 0.98, "predictions differ from lm-eval's beyond bf16 near-ties"
    return 0


if __name__ == "__main__":
    sys.exit(main())
