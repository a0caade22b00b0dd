"""``summary.html``: the result of one analysed study as a page a person reads (no scripts, no
external resources; images are the PNG montages beside it)."""

from __future__ import annotations

import html
import os
from typing import Any

from neurovfm.tokens.cache import atomic_write_text

_COLOURS = {"Urgent": "#c0392b", "Routine": "#d68910", "Normal": "#1e8449"}


def _report_html(rep: dict[str, Any]) -> list[str]:
    """The draft findings report, with what the consistency guard added or flagged marked."""
    e = html.escape
    r = rep["report"]
    out = [f"<h3>Draft findings report (machine generated; triage {e(rep['triage'])})</h3><ul>"]
    for f in r["findings"]:
        mark = " <b>[added by guard]</b>" if f.get("added_by_guard") else ""
        size = f", {f['size_mm']} mm" if f.get("size_mm") else ""
        out.append(f"<li>{e(f['label'])} ({e(f['side'])}{size}): {e(f['description'])}{mark}</li>")
    if not r["findings"]:
        out.append("<li>no findings reported</li>")
    out.append(f"</ul><p>Impression: {e(r['impression'])}</p>")
    for fl in rep.get("guard_flags", []):
        out.append(f"<p class='warn'>guard: {e(fl.get('kind', ''))} {e(str(fl.get('label', '')))}</p>")
    return out


def write_summary(out: str, result: dict[str, Any]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>neurovfm analysis</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;font-size:13px}.pos{font-weight:bold}.nop{color:#999}"
        ".badge{color:white;padding:3px 10px;border-radius:4px}.warn{color:#8a4b00}</style></head><body>",
        f"<p><b>{e(result['disclaimer'])}</b></p>",
        f"<p>Model {e(result['model']['name'])} (encoder {e(result['model']['encoder_id'][:12])}), "
        f"neurovfm {e(result['model']['code_version'])}; total {result['timings_s'].get('total', 0):.1f} s.</p>",
    ]
    if result["warnings"]:
        parts.append("<h3>Warnings</h3><ul>")
        for w in result["warnings"]:
            where = f" [{e(w['series'])}]" if w.get("series") else ""
            parts.append(f"<li class='warn'><code>{e(w['code'])}</code>{where}: {e(w['message'])}</li>")
        parts.append("</ul>")
    for ex in result["exams"]:
        lv = ex["triage"]["level"]
        parts.append(f"<h2>{e(ex['modality'])} study: <span class='badge' style='background:{_COLOURS.get(lv, '#555')}'>"
                     f"{e(lv)}</span></h2>")
        if ex["triage"]["drivers"]:
            parts.append(f"<p>Triage driven by: {e(', '.join(ex['triage']['drivers']))}</p>")
        parts.append(f"<p>Series: {e(', '.join(s['name'] for s in ex['series']))} ({ex['n_tokens']} tokens)</p>")
        if ex.get("report"):
            parts.extend(_report_html(ex["report"]))
        pngs = [(r["label"], r["maps"]["png"]) for r in ex["labels"] if r.get("maps", {}).get("png")]
        for lab, png in pngs:
            parts.append(f"<figure><img src='{e(os.path.basename(png))}' style='max-width:100%'>"
                         f"<figcaption>{e(lab)}: head attention over the image (L/R = patient's left/right)"
                         "</figcaption></figure>")
        parts.append("<table><tr><th>label</th><th>calibrated p</th><th>raw p</th><th>threshold</th>"
                     "<th>decision</th><th>acuity</th><th>side of map</th></tr>")
        rows = ex["labels"]  # in result.json's order (analyze.pipeline.row_order)
        for r in rows:
            cls = " class='pos'" if r["decision"] else (" class='nop'" if r["threshold"] is None else "")
            thr = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
            parts.append(f"<tr{cls}><td>{e(r['label'])}</td><td>{r['calibrated_probability']:.3f}</td>"
                         f"<td>{r['probability']:.3f}</td><td>{thr}</td><td>{'POSITIVE' if r['decision'] else ''}</td>"
                         f"<td>{e(r['acuity'])}</td><td>{e(r['side'])}</td></tr>")
        parts.append("</table>")
        if any(r["threshold"] is None for r in rows):
            parts.append("<p class='note'>Greyed: labels without an operating point (no positives in the model's "
                         "validation split): their probability is not calibrated, they are never called positive "
                         "and get maps only with <code>--maps all</code>.</p>")
    parts.append("<p>Maps: <code>*_map_LABEL.nii.gz</code> on each series' own grid; open them over "
                 "<code>*_image.nii.gz</code> in 3D Slicer or ITK-SNAP.</p></body></html>")
    path = os.path.join(out, "summary.html")
    atomic_write_text(path, "\n".join(parts))
    return path
