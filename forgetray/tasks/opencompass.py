"""Tasks CF evaluates that lm-eval 0.4.13 lacks (SuperGLUE's diagnostics AX-b and AX-g, CLUE's CSL) or defines
differently (OpenBookQA with its supporting fact), after OpenCompass's dataset configs, which CF used.

The prompt texts follow OpenCompass's configs as we know them (configs/datasets/<name>/<file>.py, named per task);
they were written from memory of those files, not diffed against them (no OpenCompass checkout was available), so
each docstring names the file to diff against. OpenCompass renders a base model's prompt by joining the template's
rounds with "\\n" (LMTemplateParser without a meta template), which is why the answer round's text follows "\\n".

Scoring differs by construction: OpenCompass's PPL inferencer ranks whole filled-in templates by their per-token
perplexity; forgetray, like lm-eval, scores each answer as a continuation of the shared question (acc: summed
log-likelihood; acc_norm: per character). With one-token answers (" Yes"/" No", letters) the two rankings agree.
"""

from __future__ import annotations

from forgetray.tasks.base import Doc, Task, first_index

ENTAILMENT_QUESTION = "Is the sentence below entailed by the sentence above?"


def _ax(name: str, config: str, first: str, second: str, oc_file: str) -> Task:
    return Task(
        name=name, source=f"OpenCompass {oc_file} (lm-eval has no SuperGLUE diagnostic task)",
        dataset_path="aps/super_glue", configs=(config,), eval_split="test", fewshot_split="test",
        doc_to_text=lambda d: f"{d[first]}\n{d[second]}\n{ENTAILMENT_QUESTION}",
        # The BOT round "Yes"/"No" follows the HUMAN round after OpenCompass's "\n" join.
        target_delimiter="\n", doc_to_choice=lambda d: ["Yes", "No"],
        doc_to_target=lambda d: int(d["label"]),  # ClassLabel(entailment, not_entailment): 0 -> "Yes"
        category="Reasoning",
    )


def ax_b() -> Task:
    """AX-b (SuperGLUE broad-coverage diagnostics) after OpenCompass configs/datasets/SuperGLUE_AX_b/
    SuperGLUE_AX_b_ppl_6db806.py: "{sentence1}\\n{sentence2}\\nIs the sentence below entailed by the sentence
    above?" then "\\nYes" (entailment) / "\\nNo"; aps/super_glue axb, test split (its only, labelled, split),
    0-shot; acc. CF category: Reasoning."""
    return _ax("ax_b", "axb", "sentence1", "sentence2", "configs/datasets/SuperGLUE_AX_b/SuperGLUE_AX_b_ppl_6db806.py")


def ax_g() -> Task:
    """AX-g (SuperGLUE Winogender diagnostics) after OpenCompass configs/datasets/SuperGLUE_AX_g/
    SuperGLUE_AX_g_ppl_66caf3.py: "{premise}\\n{hypothesis}\\nIs the sentence below entailed by the sentence
    above?" then "\\nYes" / "\\nNo"; aps/super_glue axg, test split, 0-shot; acc. CF category: Reasoning."""
    return _ax("ax_g", "axg", "premise", "hypothesis", "configs/datasets/SuperGLUE_AX_g/SuperGLUE_AX_g_ppl_66caf3.py")


def _obqa_fact_text(doc: Doc) -> str:
    # HUMAN round "We know the fact that {fact1}.\nQuestion: {question_stem}\n", "\n"-joined to BOT "Answer: {X}".
    return f"We know the fact that {doc['fact1']}.\nQuestion: {doc['question_stem']}\n\nAnswer:"


def openbookqa_fact() -> Task:
    """OpenBookQA with its science fact, as CF's "OpenBookQA-fact" (OpenCompass abbr `openbookqa_fact`), after
    OpenCompass configs/datasets/obqa/obqa_ppl_6aac9e.py (the template with `fact1`): allenai/openbookqa config
    "additional" (the rows with `fact1`), test split, 0-shot; "We know the fact that {fact1}.\\nQuestion:
    {question_stem}\\n\\nAnswer:" + " {choice text}"; acc (acc_norm also reported). CF category: Understanding."""
    return Task(
        name="openbookqa_fact", source="OpenCompass configs/datasets/obqa/obqa_ppl_6aac9e.py (openbookqa_fact); "
                                       "lm-eval's openbookqa uses the bare stem of the 'main' config",
        dataset_path="allenai/openbookqa", configs=("additional",), eval_split="test", fewshot_split="train",
        doc_to_text=_obqa_fact_text, doc_to_choice=lambda d: list(d["choices"]["text"]),
        doc_to_target=lambda d: first_index(d["choices"]["label"], d["answerKey"].strip()),
        scores=("acc", "acc_norm"), category="Understanding",
    )


CSL_INSTRUCTION = (  # OpenCompass FewCLUE_csl_gen_28b223.py's HUMAN prompt, up to the abstract
    "摘要是对论文内容不加注释和评论的简短陈述，要求扼要地说明研究工作的目的、研究方法和最终结论等。\n"
    "关键词是一篇学术论文的核心词汇，一般由一系列名词组成。关键词在全文中应有较高出现频率，且能起到帮助文献检索的作用。\n"
)


def _csl_text(doc: Doc) -> str:
    keywords = "，".join(doc["keyword"])  # OpenCompass CslDatasetV2 joins the keyword list with a full-width comma
    return (CSL_INSTRUCTION + f"摘要：{doc['abst']}\n关键词：{keywords}\n请问上述关键词是否匹配摘要且符合要求？\n"
            "A. 否\nB. 是\n请从”A“，”B“中进行选择。\n答：")


def csl() -> Task:
    """CSL (CLUE keyword recognition: do the keywords fit the abstract?) as CF's "CSL-dev", after OpenCompass
    configs/datasets/FewCLUE_csl/FewCLUE_csl_gen_28b223.py: the question asked with letters "A. 否 / B. 是" and
    answered right after "答：" (no delimiter), label 0 -> "A", 1 -> "B"; scored as letters. OpenCompass's PPL
    variant (FewCLUE_csl_ppl_841b62.py: "摘要：{abst}" against "摘要：{abst}\\n关键词：{keywords}") compares two texts
    one of which extends the other, which has no continuation form; hence the letter variant. Rows: id, abst,
    keyword (list), label (FewCLUE's "0"/"1" or clue/clue's int). Hub: clue/clue csl validation (CLUE's dev set);
    OpenCompass's csl_dev reads FewCLUE's dev_few_all.json: point the task at those files for that sample. CF
    category: Understanding."""
    return Task(
        name="csl", source="OpenCompass configs/datasets/FewCLUE_csl/FewCLUE_csl_gen_28b223.py (lm-eval has no CSL)",
        dataset_path="clue/clue", configs=("csl",), eval_split="validation", fewshot_split="train",
        doc_to_text=_csl_text, target_delimiter="", doc_to_choice=lambda d: ["A", "B"],
        doc_to_target=lambda d: int(d["label"]), scores=("letter",), primary="letter", category="Understanding",
    )
