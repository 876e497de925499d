"""The run report: one self-contained HTML page (figures as base64 PNG, inline CSS/JS, no network).

:func:`build_report` reads what a run directory holds and renders every section it can:

* learning curves from ``metrics.jsonl`` (with the task's baseline from ``experiment.json``), and the
  validation metrics that are not losses (error rates, accuracies) in a figure of their own,
* the gradient-flow plot from ``gradient_flow.json``,
* gate histograms and saturation scatter from ``gate_stats.json``,
* the cell-activation viewer from ``activations.json`` (a (text, activations) pair, see
  :func:`rnnkit.analysis.capture.text_activations`): the text coloured by one unit's activation,
  a control to pick the unit, and the units most correlated with quotes, line position and brackets,
* samples / predictions (``samples*.txt``, ``predictions*.txt``), other ``*.png`` files, the
  final metrics and the resolved ``config.toml``.

The figures can also be exported as PNG files (:func:`export_pngs`).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from . import plots

#: metric keys that are counters or clocks, not curves
_NOT_CURVES = {"step", "epoch", "time", "wall", "elapsed", "lr", "tokens", "items", "samples", "nonfinite",
               "wall_s", "elapsed_s", "time_s", "seconds"}


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (blank or truncated last lines are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        if isinstance(rec, dict):
            out.append(rec)
    return out


def curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Numeric series by name against ``step``; a record's ``split``/``phase``/``kind`` prefixes the name."""
    series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)):
            continue
        prefix = next((str(rec[k]) for k in ("split", "phase", "kind") if isinstance(rec.get(k), str)), "")
        for key, v in rec.items():
            if key in _NOT_CURVES or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                continue
            name = key if not prefix or key.startswith(prefix) else f"{prefix}/{key}"
            xs, ys = series[name]
            xs.append(float(step))
            ys.append(float(v))
    return dict(series)


def figures(run_dir: Path) -> dict[str, Any]:
    """Every figure the run directory supports, by file stem (matplotlib Figures, not yet rendered)."""
    run_dir = Path(run_dir)
    figs: dict[str, Any] = {}
    exp = _read_json(run_dir / "experiment.json") or {}
    series = curves(read_metrics(run_dir))
    if series:
        metric = exp.get("metric")
        if metric and exp.get("lower_is_better") is False:  # an accuracy: keep it off the loss's scale
            main = {k: v for k, v in series.items() if k.endswith("/" + metric)}
        else:
            main = {k: v for k, v in series.items() if k.endswith("loss") or (metric and k.endswith("/" + metric))}
        figs["learning_curve"] = plots.learning_curve(main or series, ylabel=exp.get("metric", "value"),
                                                      baseline=exp.get("baseline"),
                                                      title=f"{exp.get('task', run_dir.name)}: learning curve")
        # the validation metrics that are not losses (error rates, accuracies), on their own scale
        scores = {k: v for k, v in series.items() if k.startswith("eval/") and not k.endswith("loss")
                  and k not in main}
        if scores:
            figs["validation_curve"] = plots.learning_curve(scores, ylabel="value", log_y=False,
                                                            title=f"{exp.get('task', run_dir.name)}: validation")
    gf = _read_json(run_dir / "gradient_flow.json")
    if gf:
        figs["gradient_flow"] = plots.gradient_flow(gf.get("curves", gf), title=gf.get("title", ""))
    gs = _read_json(run_dir / "gate_stats.json")
    if gs and any(gs.get("layers", [])):
        figs["gate_statistics"] = plots.gate_statistics(gs)
    return figs


def export_pngs(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write every report figure as ``out_dir/<name>.png``; returns the paths."""
    return [plots.save(fig, Path(out_dir) / f"{name}.png") for name, fig in figures(Path(run_dir)).items()]


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
img{max-width:100%} pre{background:#f6f6f6;padding:.7em;overflow:auto;font-size:.85em}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
#viewer{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.5;white-space:pre-wrap;
border:1px solid #ccc;padding:.6em;max-height:28em;overflow:auto}
#viewer span.ch{border-radius:2px}
.controls{margin:.5em 0;display:flex;gap:.6em;align-items:center;flex-wrap:wrap}
.units a{cursor:pointer;color:#0645ad;margin-right:.5em}
"""

_VIEWER_JS = r"""
(function(){
  const data = JSON.parse(document.getElementById('activation-data').textContent);
  const T = data.text.length;
  const decoded = {};
  function getSeries(k) {  // {H, scale[H], q: Int8Array (unit-major, H*T)}: value = q / 127 * scale[u]
    if (!decoded[k]) {
      const s = data.series[k], bin = atob(s.q), q = new Int8Array(bin.length);
      for (let i = 0; i < bin.length; i++) q[i] = (bin.charCodeAt(i) << 24) >> 24;
      decoded[k] = {H: s.scale.length, scale: s.scale, q: q};
    }
    return decoded[k];
  }
  const keys = Object.keys(data.series);
  const sel = document.getElementById('series');
  const unit = document.getElementById('unit');
  const label = document.getElementById('unit-label');
  const viewer = document.getElementById('viewer');
  const corr = document.getElementById('correlated');
  keys.forEach(k => {
    const o = document.createElement('option'); o.value = k; o.textContent = k; sel.appendChild(o);
  });
  const spans = [];
  for (const ch of data.text) {
    const s = document.createElement('span');
    s.className = 'ch';
    s.textContent = ch === '\n' ? '\u21b5\n' : ch;
    viewer.appendChild(s); spans.push(s);
  }
  function color(v) {  // v in [-1, 1]: blue (negative) .. white .. red (positive)
    const a = Math.min(1, Math.abs(v));
    const r = v >= 0 ? 255 : Math.round(255 * (1 - a));
    const b = v >= 0 ? Math.round(255 * (1 - a)) : 255;
    const g = Math.round(255 * (1 - a));
    return 'rgb(' + r + ',' + g + ',' + b + ')';
  }
  function render() {
    const series = getSeries(sel.value);
    const H = series.H;
    unit.max = H - 1;
    let u = parseInt(unit.value, 10);
    if (!(u >= 0)) u = 0;
    if (u > H - 1) u = H - 1;
    unit.value = u;
    const scale = series.scale[u] || 1;
    for (let t = 0; t < T; t++) {
      const x = series.q[u * T + t] / 127;
      spans[t].style.backgroundColor = color(x);
      spans[t].title = 't=' + t + '  ' + sel.value + '[' + u + '] = ' + (x * scale).toPrecision(3);
    }
    label.textContent = sel.value + ' unit ' + u + ' of ' + H + ' (max |a| = ' + scale.toFixed(3) + ')';
    viewer.dataset.unit = String(u);
    viewer.dataset.series = sel.value;
    corr.innerHTML = '';
    const c = (data.correlated || {})[sel.value] || {};
    for (const feat of Object.keys(c)) {
      const div = document.createElement('div'); div.className = 'units';
      div.appendChild(document.createTextNode(feat + ': '));
      for (const [uu, r] of c[feat]) {
        const a = document.createElement('a'); a.textContent = 'unit ' + uu + ' (r=' + r + ')';
        a.addEventListener('click', () => { unit.value = uu; render(); });
        div.appendChild(a);
      }
      corr.appendChild(div);
    }
  }
  sel.addEventListener('change', render);
  unit.addEventListener('input', render);
  unit.addEventListener('change', render);
  function shift(d) {
    unit.value = Math.max(0, Math.min(parseInt(unit.max, 10), parseInt(unit.value, 10) + d));
    render();
  }
  document.getElementById('prev-unit').addEventListener('click', () => shift(-1));
  document.getElementById('next-unit').addEventListener('click', () => shift(1));
  render();
})();
"""


def _quantized(act: dict) -> dict:
    """The viewer's payload: each (T, H) series as int8 per unit, ``q = round(127 a / max_t |a|)``, unit-major
    and base64-encoded, with the per-unit scales (about 1.4 bytes per value instead of ~8 as JSON text)."""
    series = {}
    for k, v in act["series"].items():
        a = np.asarray(v, dtype=np.float64).T  # (H, T)
        scale = np.abs(a).max(1)
        q = np.round(127 * a / np.where(scale > 0, scale, 1)[:, None]).astype(np.int8)
        series[k] = {"scale": np.round(scale, 5).tolist(), "q": base64.b64encode(q.tobytes()).decode("ascii")}
    return {**act, "series": series}


def _viewer(act: dict) -> str:
    if not isinstance(act, dict) or "text" not in act or not act.get("series"):
        raise ValueError("activations.json: expected {\"text\": ..., \"series\": {name: [[...] * T]}}")
    T = len(act["text"])
    for k, v in act["series"].items():
        if len(v) != T:
            raise ValueError(f"activations.json: series {k!r} has {len(v)} steps but the text has {T} characters")
    payload = json.dumps(_quantized(act), separators=(",", ":")).replace("</", "<\\/")
    return f"""
<h2 id="activations">Cell activations</h2>
<p>The text coloured by one unit's activation (red positive, blue negative, scaled by the unit's largest
|value| in this text). Pick the layer/state and the unit; hover a character for its value.</p>
<div class="controls">
 <label>state <select id="series"></select></label>
 <button id="prev-unit" type="button">&larr;</button>
 <label>unit <input id="unit" type="number" min="0" value="0" style="width:5em"></label>
 <button id="next-unit" type="button">&rarr;</button>
 <span id="unit-label"></span>
</div>
<div id="viewer"></div>
<h3>Units that track quotes, line position, brackets (|Pearson r|)</h3>
<div id="correlated"></div>
<script type="application/json" id="activation-data">{payload}</script>
<script>{_VIEWER_JS}</script>
"""


def build_report(run_dir: str | Path) -> str:
    """The report page of ``run_dir`` as an HTML string."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir: {str(run_dir)!r} is not a directory")
    exp = _read_json(run_dir / "experiment.json") or {}
    parts = [f"<h1>rnnkit run report: {html.escape(run_dir.resolve().name)}</h1>"]
    final = exp.get("result") or _read_json(run_dir / "final_metrics.json")
    if final:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                       for k, v in final.items())
        parts.append(f"<h2>Result</h2><table>{rows}</table>")
    titles = {"learning_curve": "Learning curve", "validation_curve": "Validation metrics",
              "gradient_flow": "Gradient flow through time", "gate_statistics": "Gate statistics"}
    for name, fig in figures(run_dir).items():
        parts.append(f'<h2 id="{name}">{titles.get(name, name)}</h2>' + _img(plots.to_png_bytes(fig), name))
    act = _read_json(run_dir / "activations.json")
    if act:
        parts.append(_viewer(act))
    own = {f"{name}.png" for name in titles}
    for png in sorted(run_dir.glob("*.png")) + sorted((run_dir / "plots").glob("*.png")):
        if png.name not in own:
            parts.append(f"<h2>{html.escape(png.stem)}</h2>" + _img(png.read_bytes(), png.stem))
    for txt in sorted(run_dir.glob("samples*.txt")) + sorted(run_dir.glob("predictions*.txt")):
        text = txt.read_text(errors="replace")[:20000]
        parts.append(f"<h2>{html.escape(txt.stem)}</h2><pre>{html.escape(text)}</pre>")
    cfg = run_dir / "config.toml"
    if cfg.is_file():
        parts.append(f"<h2>Configuration</h2><pre>{html.escape(cfg.read_text())}</pre>")
    if len(parts) == 1:
        raise FileNotFoundError(f"run_dir: {str(run_dir)!r} holds nothing to report (no metrics.jsonl, "
                                "experiment.json, gradient_flow.json, gate_stats.json, activations.json, "
                                "config.toml, *.png or samples*.txt)")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>rnnkit report: {html.escape(run_dir.resolve().name)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``build_report(run_dir)`` to ``out`` (default ``run_dir/report.html``)."""
    page = build_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["build_report", "write_report", "export_pngs", "figures", "read_metrics", "curves"]
