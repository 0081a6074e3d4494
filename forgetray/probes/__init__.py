"""Batched probes of a causal LM (docs/methods.md §3): multiple-choice knowledge and probing-set perplexity.

Layout, one concept per module, each depending only on those listed before it: `tokens` (how text becomes model
input: encoding, the BOS rule, left truncation, the padding rule, the one model call), `options` (`ProbeOptions`:
batch size, max length, BOS rule, device and shard, what every probe function takes), `prompts` (the letter and
option-likelihood prompt formats, text only), `shards` (which items a rank evaluates, padded so every rank makes
the same forward calls), `knowledge` (letter scoring and option likelihood, their summary, merging ranks' frames)
and `perplexity` (per-passage NLLs and their sum). `scoring` (with `forward_passes`, its forward calls) scores
`MCPrompt`s as lm-eval does, faster (`score_prompts`); `knowledge` is built on it, and so is `tasks` (a
benchmark's prompts with its scores computed per question as lm-eval computes them: `probe_task`,
`summarize_task`). The question type and its file format are data, in `forgetray.data.questions`. This package
re-exports the public names, so callers write `probes.probe_knowledge`.
"""

from forgetray.probes.knowledge import (KNOWLEDGE_COLUMNS, LETTER_RULES, encode_continuations, letter_prompts,
                                        mc_prompts, merge_shards, option_sequences, probe_knowledge,
                                        summarize_knowledge)
from forgetray.probes.options import LM_EVAL, ProbeOptions
from forgetray.probes.perplexity import passage_nlls, passage_sequences, probe_perplexity, sequence_nlls
from forgetray.probes.prompts import (format_letter_prompt, format_letter_question, format_option_context,
                                      format_option_continuations, select_shots)
from forgetray.probes.scoring import PromptScore, score_prompts, score_shares
from forgetray.probes.shards import shard_indices
from forgetray.probes.tasks import TASK_SCORES, probe_task, summarize_task, task_columns
from forgetray.probes.tokens import (BOS_RULES, bos_prefix, check_sizes, encode, encode_contexts, encode_pairs,
                                     forward, letter_token_ids, pad_right, padding_id, truncate_left)

__all__ = [
    "BOS_RULES", "KNOWLEDGE_COLUMNS", "LETTER_RULES", "LM_EVAL", "ProbeOptions", "PromptScore", "encode_contexts",
    "encode_pairs", "mc_prompts", "score_prompts", "score_shares", "bos_prefix", "check_sizes", "encode", "encode_continuations",
    "format_letter_prompt", "format_letter_question", "format_option_context", "format_option_continuations", "forward", "letter_prompts",
    "letter_token_ids", "merge_shards", "option_sequences", "pad_right", "padding_id", "passage_nlls",
    "passage_sequences", "probe_knowledge", "probe_perplexity", "select_shots", "sequence_nlls", "shard_indices",
    "summarize_knowledge", "truncate_left", "TASK_SCORES", "probe_task", "summarize_task", "task_columns",
]
