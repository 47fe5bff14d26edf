"""Markdown tables of the passage experiment (docs/results/passages.md) from the JSONL files
``scripts/passages_experiment.py`` writes. Prints them; ``--write FILE`` replaces the text
between ``<!-- tables:begin -->`` and ``<!-- tables:end -->`` in FILE.

    PYTHONPATH=. python scripts/passages_table.py --write docs/results/passages.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editkit.eval.metrics import mean_ci
from editkit.passages.evaluate import summarise

LABELS = {
    "ft_l": "FT+L (sequential)", "rome": "ROME, subject key (sequential)",
    "rome_last": "ROME, last-token key, l=2 (sequential)", "memit": "MEMIT (one batch)",
    "memit_last": "MEMIT, last-token key, layers 1–2 (one batch)",
    "alphaedit": "AlphaEdit (one batch)",
    "rome_last_pattern": "ROME last-token l=2, pattern-extracted triples",
    "memit_model": "MEMIT, model-extracted triples",
}
ORDER = list(LABELS)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _pct(ci: dict | None) -> str:
    if not ci or ci.get("mean") is None:
        return "—"
    half = ci.get("ci95")
    return f"{100 * ci['mean']:.1f}" + ("" if half is None else f" ± {100 * half:.1f}")


def _share(s: dict) -> str:
    if s.get("share") is None:
        gain = s.get("gain")
        return "undefined" + ("" if gain is None else f" (b−a = {100 * gain:.1f})")
    lo, hi = s.get("lo"), s.get("hi")
    rng = "" if lo is None else f" [{100 * lo:.0f}, {100 * hi:.0f}]"
    return f"{100 * s['share']:.0f}%{rng}"


def _ge(ci: dict | None) -> str:
    return "—" if not ci or ci.get("mean") is None else f"{ci['mean']:.2f}"


def tables(folder: Path) -> str:
    out = []
    for name, title in (("factworld", "Fact world (shipped GPT-2, 4 layers, 128 hidden)"),
                        ("smollm2", "SmolLM2-135M-Instruct")):
        files = {p.stem[len(name) + 1:]: p for p in folder.glob(f"{name}_*.jsonl")}
        configs = [c for c in ORDER if c in files]
        if not configs:
            continue
        out.append(f"### {title}\n")
        out.append("| Edit | passages | facts | (a) unedited | (b) passage in context | "
                   "(c) edited | share of gain | (a) gen | (b) gen | (c) gen | share (gen) | "
                   "NS before → after | GE before → after | s / passage |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in configs:
            rows = _rows(files[c])
            s = summarise(rows)
            secs = mean_ci([r.get("seconds") for r in rows])
            out.append(
                f"| {LABELS[c]} | {len(rows)} | {sum(r['n_facts'] for r in rows)} | "
                f"{_pct(s.get('a_cloze'))} | {_pct(s.get('b_cloze'))} | {_pct(s.get('c_cloze'))}"
                f" | {_share(s['share_cloze'])} | {_pct(s.get('a_gen'))} | "
                f"{_pct(s.get('b_gen'))} | {_pct(s.get('c_gen'))} | {_share(s['share_gen'])} | "
                f"{_pct(s.get('ns_before'))} → {_pct(s.get('ns_after'))} | "
                f"{_ge(s.get('ge_before'))} → {_ge(s.get('ge_after'))} | "
                f"{'—' if secs['mean'] is None else format(secs['mean'], '.1f')} |")
        out.append("")
        ref = files.get("incontext")
        if ref:
            rows = _rows(ref)
            s = summarise([{**r, "c_cloze": None, "c_gen": None} for r in rows])
            out.append(f"In-context reference alone (no edit) on all {len(rows)} passages: "
                       f"cloze (a) {_pct(s.get('a_cloze'))} → (b) {_pct(s.get('b_cloze'))}, "
                       f"generation (a) {_pct(s.get('a_gen'))} → (b) {_pct(s.get('b_gen'))}.\n")
        ex = files.get("extract")
        if ex:
            rows = _rows(ex)
            p, r = mean_ci([x["precision"] for x in rows]), mean_ci([x["recall"] for x in rows])
            found = sum(x["n_found"] for x in rows)
            correct = sum(x["n_correct"] for x in rows)
            true = sum(x["n_true"] for x in rows)
            rejected = sum(len(x["rejected"]) for x in rows)
            kind = "pattern" if name == "factworld" else "model (SmolLM2-135M-Instruct itself)"
            out.append(f"Extractor **{kind}** on {len(rows)} passages: {found} triples kept, "
                       f"{correct} correct of {true} true (micro precision "
                       f"{100 * correct / max(found, 1):.1f}%, recall {100 * correct / true:.1f}%);"
                       f" per-passage precision {_pct(p)} (over the {p['n']} passages with a "
                       f"triple), recall {_pct(r)}; {rejected} lines rejected with a reason.\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="docs/results/passages")
    ap.add_argument("--write")
    args = ap.parse_args()
    text = tables(Path(args.folder))
    if not args.write:
        print(text)
        return
    doc = Path(args.write).read_text(encoding="utf-8")
    head, _, rest = doc.partition("<!-- tables:begin -->")
    _, _, tail = rest.partition("<!-- tables:end -->")
    Path(args.write).write_text(f"{head}<!-- tables:begin -->\n{text}\n<!-- tables:end -->{tail}",
                                encoding="utf-8")


if __name__ == "__main__":
    main()
