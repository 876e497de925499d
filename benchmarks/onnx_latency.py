"""ONNX export speed: streaming latency per step, sequence throughput, export time and file size.

For a stacked LSTM (default 2 x 256, input 256, the issue's shape):

* streaming, B = 1: median time of one step of the exported streaming graph in onnxruntime
  (one intra-op thread, every graph optimisation), of ``rnnkit.LSTM.step()``, and of a plain
  ``torch.nn.LSTM`` called on a length-1 sequence, each over ``--steps`` steps carrying the state;
* sequence, T = 100, B = 32: median time of the exported sequence graph in onnxruntime against the
  ``rnnkit.LSTM`` forward and ``torch.nn.LSTM`` (torch's threads; onnxruntime's default threads);
* export time of each graph and the size of its file.

Prints one JSON object (and writes it to ``--json``). Smoke run on a tiny size:

    python benchmarks/onnx_latency.py --hidden 16 --input 8 --steps 50 --seq-repeats 3 --seq-len 10 --batch 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rnnkit
from rnnkit.export import OnnxRunner, to_onnx


class _Seq(nn.Module):
    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm(x, (h0, c0))
        return y, h, c


class _Step(_Seq):
    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm.step(x, (h0, c0))
        return y, h, c


def _median_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _export(module: nn.Module, args: tuple, streaming: bool, path: Path) -> tuple[OnnxRunner, float, int]:
    axes = {"x": {0: "B"} if streaming else {0: "T", 1: "B"}, "h0": {1: "B"}, "c0": {1: "B"}}
    t0 = time.perf_counter()
    res = to_onnx(module, args, input_names=["x", "h0", "c0"], output_names=["y", "h", "c"], dynamic_axes=axes,
                  streaming=streaming, metadata={"rnnkit.state": [["h0", "h"], ["c0", "c"]]})
    seconds = time.perf_counter() - t0
    res.save(path)
    return OnnxRunner(path), seconds, path.stat().st_size


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--cell", default="lstm", help="registry cell of the rnnkit model (default lstm)")
    ap.add_argument("--steps", type=int, default=2000, help="streaming steps timed (median)")
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-repeats", type=int, default=30)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch's intra-op threads (default: torch's own; onnxruntime streams on one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    I, H, L = args.input, args.hidden, args.layers
    ours = rnnkit.build(args.cell, I, H, num_layers=L).eval()
    ref = nn.LSTM(I, H, num_layers=L).eval()
    if args.cell in ("lstm", "lstm_fb0"):
        ref.load_state_dict(ours.state_dict(), strict=False)
    out: dict = {"cell": args.cell, "input": I, "hidden": H, "layers": L, "torch": torch.__version__,
                 "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        zeros = (torch.zeros(L, 1, H), torch.zeros(L, 1, H))
        stream, out["export_streaming_s"], out["file_streaming_bytes"] = _export(
            _Step(ours), (torch.randn(2, I), torch.zeros(L, 2, H), torch.zeros(L, 2, H)), True,
            Path(tmp) / "step.onnx")
        seq, out["export_sequence_s"], out["file_sequence_bytes"] = _export(
            _Seq(ours), (torch.randn(3, 2, I), torch.zeros(L, 2, H), torch.zeros(L, 2, H)), False,
            Path(tmp) / "seq.onnx")
        out["mapping"] = json.loads(stream.metadata["rnnkit.mapping"])

        # ---- streaming, B = 1 ----
        xs = torch.randn(args.steps + 10, 1, I)
        it = {"t": 0}
        state = {"ours": zeros, "ref": zeros, "onnx": stream.initial_state(1)}

        def ort_step():
            t = it["t"] = (it["t"] + 1) % xs.shape[0]
            _, state["onnx"] = stream.step({"x": xs[t].numpy()}, state["onnx"])

        def ours_step():
            t = it["t"] = (it["t"] + 1) % xs.shape[0]
            _, state["ours"] = ours.step(xs[t], state["ours"])

        def ref_step():
            t = it["t"] = (it["t"] + 1) % xs.shape[0]
            _, state["ref"] = ref(xs[t:t + 1], state["ref"])

        out["step_ms_onnxruntime"] = _median_ms(ort_step, args.steps)
        out["step_ms_rnnkit_step"] = _median_ms(ours_step, args.steps)
        out["step_ms_torch_nn_lstm"] = _median_ms(ref_step, args.steps)
        out["step_speedup_vs_torch"] = out["step_ms_torch_nn_lstm"] / out["step_ms_onnxruntime"]

        # ---- sequence, T x B ----
        T, B = args.seq_len, args.batch
        x = torch.randn(T, B, I)
        h0 = (torch.zeros(L, B, H), torch.zeros(L, B, H))
        feeds = {"x": x.numpy(), "h0": h0[0].numpy(), "c0": h0[1].numpy()}
        seq_threads = OnnxRunner(Path(tmp) / "seq.onnx")  # onnxruntime's default thread count
        np.testing.assert_allclose(seq_threads.run(feeds)["y"], ours(x, h0)[0].numpy(), rtol=1e-4, atol=1e-4)
        out["seq_ms_onnxruntime"] = _median_ms(lambda: seq_threads.run(feeds), args.seq_repeats, warmup=2)
        out["seq_ms_rnnkit"] = _median_ms(lambda: ours(x, h0), args.seq_repeats, warmup=2)
        out["seq_ms_torch_nn_lstm"] = _median_ms(lambda: ref(x, h0), args.seq_repeats, warmup=2)
        out["seq_ratio_onnx_over_torch"] = out["seq_ms_onnxruntime"] / out["seq_ms_torch_nn_lstm"]
        out.update(seq_len=T, batch=B, steps=args.steps, seq_repeats=args.seq_repeats)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return out


if __name__ == "__main__":
    main()
