"""`essence analyze`: where a trace's knowledge sits along its chain of thought (the paper's view).

Every record is rendered as training renders it (the student's chat template). Each CoT token
(the CoT segment: the think tags and the reasoning) falls in a decile of its position in the
CoT, d = floor(10 · (i − cot_start) / cot_length), and three things are measured:

- **teacher entropy**: the entropy (nats) of the teacher's next-token distribution at the
  position that predicts the token: low where the trace is predictable (re-checks that repeat
  the working), high where it carries information;
- **student–teacher KL** (with `--student`): KL(p_T ‖ p_S) there before any training (nats; the
  forward KL the KD loss minimizes): what the student still has to learn at that position;
- **first correct derivation**: the first CoT token by whose end the trace has stated the
  final answer's value (a number, fraction or choice letter the grader finds equal to the
  answer's last `\\boxed{}`), as a fraction of the CoT; a record whose CoT never states it
  counts as "never".

Decile values are token-weighted means over all records. Only the first len(tokenizer) logit
columns are compared, as in training.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI builds its parser from this module: keep torch out of its import
    import torch

    from essence.data.records import Record
    from essence.data.render import Rendered

DECILES = 10
_NUMBER = re.compile(r"\\frac\{[^{}]*\}\{[^{}]*\}|\\boxed\{[^{}]*\}|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?(?![\w.]\d)")
_LETTER = re.compile(r"(?<![\w\\])([A-E])(?![\w])")


@dataclass
class Analysis:
    """Per-decile sums over all records, and where each record first states its answer."""

    entropy_sum: list[float] = field(default_factory=lambda: [0.0] * DECILES)
    kl_sum: list[float] = field(default_factory=lambda: [0.0] * DECILES)
    tokens: list[int] = field(default_factory=lambda: [0] * DECILES)
    first_statement: list[float | None] = field(default_factory=list)
    """Per record: the fraction of its CoT by which the answer is stated (None: never)."""
    with_student: bool = False

    def rows(self) -> list[dict]:
        """One row per decile: its token count and mean entropy (and KL)."""
        out = []
        for d in range(DECILES):
            n = self.tokens[d]
            row = {"decile": d, "tokens": n, "teacher_entropy": self.entropy_sum[d] / n if n else None}
            if self.with_student:
                row["student_teacher_kl"] = self.kl_sum[d] / n if n else None
            out.append(row)
        return out

    def summary(self) -> dict:
        stated = [f for f in self.first_statement if f is not None]
        return {
            "records": len(self.first_statement),
            "deciles": self.rows(),
            "first_statement": {
                "stated": len(stated),
                "never": len(self.first_statement) - len(stated),
                "median": statistics.median(stated) if stated else None,
                "mean": statistics.mean(stated) if stated else None,
                "per_record": self.first_statement,
            },
        }


def cot_deciles(cot: tuple[int, int]) -> list[int]:
    """The decile of each CoT token position (cot: [start, end) token span)."""
    start, end = cot
    return [DECILES * (i - start) // (end - start) for i in range(start, end)]


def token_stats(teacher_logits: torch.Tensor, student_logits: torch.Tensor | None,
                vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher entropy and KL(p_T ‖ p_S) per position, in nats, fp32.

    teacher_logits, student_logits: [tokens, width ≥ vocab_size] → two [tokens] tensors.
    """
    import torch

    from essence.loss.divergences import divergence

    lt = torch.log_softmax(teacher_logits[:, :vocab_size].float(), dim=-1)
    entropy = -(lt.exp() * lt).sum(-1)
    if student_logits is None:
        return entropy, None
    kl = divergence(student_logits, teacher_logits, "forward_kl", vocab_size=vocab_size)
    return entropy, kl


def gold_value(record: Record) -> str | None:
    """The final answer as the grader reads a gold answer: the answer's last box, bare."""
    from essence.eval.grading import clean_gold, last_boxed

    boxed = last_boxed(record.answer)
    return clean_gold(boxed) if boxed is not None else None


def first_statement(rendered: Rendered, record: Record, gold: str) -> float | None:
    """Fraction of the CoT span by whose token the CoT has first stated `gold` (None: never)."""
    start, end = rendered.spans.cot
    if end <= start or not record.cot:
        return None
    cot_at = rendered.text.find(record.cot, rendered.offsets[start][0])
    pattern = _LETTER if re.fullmatch(r"\\text\{\(?[A-E]\)?\}|\(?[A-E]\)?", gold) else _NUMBER
    letter = re.sub(r"[^A-E]", "", gold.replace("\\text", "")) if pattern is _LETTER else None
    for match in pattern.finditer(record.cot):
        if (match.group(1) == letter) if letter else _same_value(match.group(0), gold):
            last_char = cot_at + match.end() - 1
            token = next(i for i in range(start, end) if rendered.offsets[i][1] > last_char)
            return (token - start + 1) / (end - start)
    return None


def _same_value(candidate: str, gold: str) -> bool:
    """Equal as the grader says; plain numbers are compared exactly without asking it."""
    a, b = _as_fraction(candidate), _as_fraction(gold)
    if a is not None and b is not None:
        return a == b
    from essence.eval.grading import grade

    return grade(f"\\boxed{{{candidate}}}", gold)


def _as_fraction(text: str) -> Fraction | None:
    text = text.removeprefix("\\boxed{").removesuffix("}") if text.startswith("\\boxed{") else text
    try:
        return Fraction(text.replace(",", "")) if re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", text) else None
    except (ValueError, ZeroDivisionError):
        return None


def analyze(rendered: list[Rendered], records: list[Record], teacher, student=None, *,
            vocab_size: int) -> Analysis:
    """Per-decile teacher entropy (and student KL) over the CoT tokens, and first statements."""
    import torch

    result = Analysis(with_student=student is not None)
    for item, record in zip(rendered, records):
        start, end = item.spans.cot
        if end - start < 1:
            result.first_statement.append(None)
            continue
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[0]
            s_logits = student(input_ids=ids).logits[0] if student is not None else None
        # Position p predicts token p + 1: the CoT tokens [start, end) are predicted by [start-1, end-1).
        rows = slice(start - 1, end - 1)
        entropy, kl = token_stats(t_logits[rows], None if s_logits is None else s_logits[rows], vocab_size)
        for j, d in enumerate(cot_deciles((start, end))):
            result.entropy_sum[d] += float(entropy[j])
            result.kl_sum[d] += float(kl[j]) if kl is not None else 0.0
            result.tokens[d] += 1
        gold = gold_value(record)
        result.first_statement.append(first_statement(item, record, gold) if gold else None)
    return result


def plot(summary: dict, path: Path, title: str) -> None:
    """Entropy (and KL) per CoT decile, with the median first statement of the answer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["deciles"]
    x = [(r["decile"] + 0.5) / DECILES for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [r["teacher_entropy"] for r in rows], marker="o", label="teacher entropy (nats)")
    if "student_teacher_kl" in rows[0]:
        ax.plot(x, [r["student_teacher_kl"] for r in rows], marker="s", label="KL(teacher ‖ student) (nats)")
    median = summary["first_statement"]["median"]
    if median is not None:
        ax.axvline(median, color="grey", linestyle="--", label=f"answer first stated (median {median:.2f})")
    ax.set_xlabel("position in the chain of thought (fraction)")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summary: dict) -> str:
    """A plain-text table of the deciles and the first-statement line."""
    rows = summary["deciles"]
    kl = "student_teacher_kl" in rows[0]
    lines = ["decile  tokens  teacher entropy" + ("  KL(T‖S)" if kl else "")]
    for r in rows:
        cell = lambda v: f"{v:15.3f}" if v is not None else f"{'-':>15}"  # noqa: E731
        line = f"{r['decile'] * 10:>3}-{r['decile'] * 10 + 10:<3} {r['tokens']:>6}  {cell(r['teacher_entropy'])}"
        if kl:
            kv = r["student_teacher_kl"]
            line += f"  {kv:8.3f}" if kv is not None else f"  {'-':>8}"
        lines.append(line)
    fs = summary["first_statement"]
    where = f"median {fs['median']:.2f}, mean {fs['mean']:.2f} of the CoT" if fs["median"] is not None else "-"
    lines.append(f"answer first stated in the CoT: {fs['stated']} of {summary['records']} records ({where}); "
                 f"never: {fs['never']}")
    return "\n".join(lines)


def analyze_command(data: str, teacher: str, *, student: str | None, tokenizer: str | None,
                    limit: int | None, out: str | None, system_prompt: str = "keep",
                    chat_template: str | None = None) -> dict:
    """`essence analyze`: read, render, measure; print the table, write analysis.json/png to `out`."""
    from essence.data.pipeline import DataConfig, render_records
    from essence.data.records import read_records
    from essence.io import check_out_dir, write_json_atomic
    from essence.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tokenizer or student or teacher)
    config = DataConfig(source=data, limit=limit, system_prompt=system_prompt, chat_template=chat_template)
    records = read_records(data).records
    records = records[:limit] if limit else records
    rendered, _ = render_records(records, tok, config, data)
    kept = {r.record_id for r in rendered}
    records = [r for r in records if r.id in kept]
    models = [load_causal_lm(teacher, role="teacher", flag="--teacher").eval()]
    if student:
        models.append(load_causal_lm(student, role="student", flag="--student").eval())
    result = analyze(rendered, records, models[0], models[1] if student else None, vocab_size=len(tok))
    summary = {"data": data, "teacher": teacher, "student": student, **result.summary()}
    print(format_table(summary))
    if out:
        folder = check_out_dir(out)
        write_json_atomic(folder / "analysis.json", summary)
        who = f"teacher {teacher}" + (f", student {student}" if student else "")
        plot(summary, folder / "analysis.png", f"{Path(data).name}: {who}")
        print(f"wrote {folder / 'analysis.json'} and {folder / 'analysis.png'}")
    return summary


def add_parser(sub) -> None:
    """The `essence analyze` subcommand."""
    from essence.fields import count

    p = sub.add_parser("analyze", help="teacher entropy, student KL and the first derivation per CoT decile")
    p.add_argument("data", help="a .jsonl/.json/.parquet file or a hub dataset name")
    p.add_argument("--teacher", required=True, help="teacher model (folder, hub id or essence: asset)")
    p.add_argument("--student", default=None, help="student model: adds KL(teacher ‖ student) per decile")
    p.add_argument("--tokenizer", default=None, help="default: the student's, else the teacher's")
    p.add_argument("--limit", type=count, default=None, help="the first N records")
    p.add_argument("--system-prompt", default="keep", help="keep, drop, or a replacement text")
    p.add_argument("--chat-template", default=None, help="built-in name or Jinja file")
    p.add_argument("--out", default=None, help="folder for analysis.json and analysis.png")
    p.set_defaults(func=lambda args: analyze_command(
        args.data, args.teacher, student=args.student, tokenizer=args.tokenizer, limit=args.limit,
        out=args.out, system_prompt=args.system_prompt, chat_template=args.chat_template) and 0)
