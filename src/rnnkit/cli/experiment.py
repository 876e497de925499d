"""``rnnkit experiment``: long-term-dependency tasks, gradient flow through time, the ablation grid.

    rnnkit experiment adding --length 100 --cell lstm --steps 4000 --out runs/adding-lstm --json
    rnnkit experiment copy --length 100 --cell gru --minutes 10
    rnnkit experiment temporal-order --variant b --cell lstm_nfg
    rnnkit experiment agreement --length 30 --cell rnn
    rnnkit experiment gradient-flow --cells rnn,lstm,gru --steps 1000 --out runs/gradflow
    rnnkit experiment ablation --tasks adding,agreement --variants lstm,lstm_nfg,gru --seeds 3 --jobs 2

Config layering for the task commands: the experiment defaults (Adam 1e-3, batch 50, clip 1) <
``--config`` TOML < ``--set KEY=VALUE`` < the flags.
"""

import json
from pathlib import Path
from typing import Annotated, Any

import tomllib
import typer

from .common import RunOptions, emit, run_command, user_errors
from .model_flags import (
    Backend,
    CandAct,
    Coupled,
    DropGate,
    ForgetBias,
    GateAct,
    LayerNorm,
    Nonlin,
    OutAct,
    Peephole,
    RecDrop,
    ResetAfter,
    Zoneout,
    variant_flags,
)

NAME = "experiment"
app = typer.Typer(help="Long-term-dependency experiments: adding, copy, temporal order, agreement; gradient flow; "
                       "ablations.", no_args_is_help=True)

Cell = Annotated[str | None, typer.Option("--cell", help="Registry cell name (see `rnnkit cells`).")]
Length = Annotated[int | None, typer.Option("--length", help="Sequence length T.")]
Hidden = Annotated[int | None, typer.Option("--hidden", help="Hidden units.")]
Layers = Annotated[int | None, typer.Option("--layers", help="Stacked layers.")]
Batch = Annotated[int | None, typer.Option("--batch", help="Sequences per step (default 50).")]
Lr = Annotated[float | None, typer.Option("--lr", help="Learning rate (default Adam 1e-3).")]
StopAt = Annotated[float | None, typer.Option(
    "--stop-at", help="Stop once the test metric reaches this value (e.g. 0.01 for adding).")]
EvalEvery = Annotated[int | None, typer.Option("--eval-every", help="Evaluate every N steps (default 200).")]
TestSamples = Annotated[int | None, typer.Option("--test-samples", help="Fresh test sequences (default 1000).")]
NoAnalysis = Annotated[bool, typer.Option("--no-analysis", help="Skip gradient flow and gate statistics.")]
def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            from ..errors import UserError

            raise UserError(f"--set {key}: {p!r} is a value, not a section")
    node[parts[-1]] = value


def load_experiment_config(opts: RunOptions, task: str, flags: dict[str, Any]):
    """Experiment defaults < --config TOML < --set < flags (dotted keys, None = not given)."""
    from ..errors import UserError
    from ..tasks.synthetic import ExperimentConfig
    from ..train.config import config_from_dict, config_to_dict, parse_override

    data = config_to_dict(ExperimentConfig())
    data["data"]["task"] = task
    if opts.config is not None:
        if not opts.config.is_file():
            raise UserError(f"--config: file not found: {str(opts.config)!r}")
        try:
            data = _merge(data, tomllib.loads(opts.config.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--config {str(opts.config)!r}: not valid TOML: {e}") from None
    for item in opts.set:
        keys, value = parse_override(item)
        _set_dotted(data, ".".join(keys), value)
    for key, value in {**opts.flag_overrides("trainer"), **flags}.items():
        if value is not None:
            _set_dotted(data, key, value)
    if data.get("data", {}).get("task", task) != task:
        raise UserError(f"data.task: this command runs {task!r}, but the config says {data['data']['task']!r}")
    _set_dotted(data, "data.task", task)
    return config_from_dict(ExperimentConfig, data)


def _task_command(task: str, doc: str):
    def command(cell: Cell = None, length: Length = None, hidden: Hidden = None, layers: Layers = None,
                batch: Batch = None, lr: Lr = None, stop_at: StopAt = None, eval_every: EvalEvery = None,
                test_samples: TestSamples = None, no_analysis: NoAnalysis = False, backend: Backend = None,
                peephole: Peephole = None, coupled: Coupled = None, drop_gate: DropGate = None,
                output_activation: OutAct = None, gate_activation: GateAct = None,
                candidate_activation: CandAct = None, forget_bias: ForgetBias = None, layer_norm: LayerNorm = None,
                nonlinearity: Nonlin = None, reset_after: ResetAfter = None, zoneout: Zoneout = None,
                recurrent_dropout: RecDrop = None, variant: Annotated[str | None, typer.Option(
                    "--variant", help="temporal-order only: a (4 classes) or b (8 classes).")] = None,
                *, opts: RunOptions) -> None:
        from ..tasks.synthetic import run_experiment

        flags = {"model.cell": cell, "data.length": length, "model.hidden_size": hidden,
                 "model.num_layers": layers, "trainer.batch_size": batch, "trainer.optim.lr": lr,
                 "stop_at": stop_at, "trainer.eval_every": eval_every, "data.test_samples": test_samples,
                 "data.variant": variant,
                 **variant_flags(backend=backend, peephole=peephole, coupled=coupled, drop_gates=drop_gate,
                                 output_activation=output_activation, gate_activation=gate_activation,
                                 candidate_activation=candidate_activation, forget_bias=forget_bias,
                                 layer_norm=layer_norm, nonlinearity=nonlinearity, reset_after=reset_after,
                                 zoneout=zoneout, recurrent_dropout=recurrent_dropout)}
        cfg = load_experiment_config(opts, task, flags)
        if cfg.trainer.steps is None and cfg.trainer.epochs is None and cfg.trainer.minutes is None:
            cfg = load_experiment_config(opts, task, {**flags, "trainer.steps": 2000})
            opts.info("no budget given: training for 2000 steps (use --steps or --minutes)")
        run_dir = opts.run_dir
        result = run_experiment(cfg, run_dir, resume=opts.resume, quiet=opts.quiet, analyse=not no_analysis)
        result["run_dir"] = str(run_dir)
        opts.emit(result)

    command.__doc__ = doc
    command.__name__ = task.replace("-", "_")
    return command


for _name, _doc in (
    ("adding", "The adding problem (Arjovsky et al. form); metric test MSE, baseline 1/6."),
    ("copy", "Copying memory (10 symbols from 8, T blanks); metric test cross-entropy, baseline 10 ln 8/(T+20)."),
    ("temporal-order", "Temporal order (Hochreiter & Schmidhuber 1997, exp. 6a/6b); metric test accuracy."),
    ("agreement", "Subject-verb number agreement across a distractor clause; metric test accuracy."),
):
    app.command(_name, help=_doc)(run_command("experiment")(_task_command(_name, _doc)))


@app.command("gradient-flow")
def gradient_flow_cmd(
    cells: Annotated[str, typer.Option("--cells", help="Comma-separated registry cells.")] = "rnn,lstm,gru",
    task: Annotated[str, typer.Option("--task", help="Task whose loss is differentiated.")] = "adding",
    length: Length = 100,
    hidden: Hidden = 128,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per cell (0: untrained only).")] = 0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    runs: Annotated[list[Path] | None, typer.Option(
        "--from", help="Combine the gradient_flow.json of finished experiment runs instead (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
    debug: Annotated[bool, typer.Option("--debug")] = False,
) -> None:
    """Plot the norm of dL_T/dh_t (and dL_T/dc_t) over t for RNN, LSTM and GRU, untrained and trained."""
    with user_errors(debug):
        from ..analysis import plots
        from ..analysis.gradflow import decay_per_step
        from ..errors import UserError

        out_dir = out or Path("runs") / "gradient-flow"
        curves: dict[str, Any] = {}
        if runs:
            for r in runs:
                f = Path(r) / "gradient_flow.json"
                if not f.is_file():
                    raise UserError(f"--from {str(r)!r}: no gradient_flow.json (run an experiment without "
                                    f"--no-analysis first)")
                curves.update(json.loads(f.read_text())["curves"])
        else:
            from ..tasks.synthetic import DataConfig, ExperimentConfig, ModelConfig, run_experiment
            from ..train.config import replace_config

            names = [c.strip() for c in cells.split(",") if c.strip()]
            for cell in names:
                base = ExperimentConfig(ModelConfig(cell=cell, hidden_size=hidden),
                                        DataConfig(task=task, length=length, test_samples=200))
                cfg = replace_config(base, **{"trainer.steps": max(steps, 1), "trainer.seed": seed,
                                              "trainer.eval_every": 0, "trainer.tensorboard": False})
                if steps == 0:
                    from ..tasks.synthetic import build_model, gradient_flow_of, task_from_config
                    from ..train import seed_everything

                    seed_everything(seed)
                    t = task_from_config(cfg.data)
                    model = build_model(cfg, t)
                    curves[f"{cell} (untrained)"] = gradient_flow_of(model, t, t.test_set(32, seed))
                    continue
                if not quiet:
                    typer.echo(f"training {cell} for {steps} steps", err=True)
                run_experiment(cfg, out_dir / cell, quiet=quiet)
                curves.update(json.loads((out_dir / cell / "gradient_flow.json").read_text())["curves"])
        out_dir.mkdir(parents=True, exist_ok=True)
        title = f"Gradient flow through time ({task}, T={length})" if not runs else "Gradient flow through time"
        (out_dir / "gradient_flow.json").write_text(json.dumps({"curves": curves, "title": title}))
        plots.save(plots.gradient_flow(curves, title=title), out_dir / "gradient_flow.png")
        summary: dict[str, Any] = {"out": str(out_dir), "plot": str(out_dir / "gradient_flow.png")}
        for label, g in curves.items():
            for k, v in g.items():
                first, last = max(v[0], 1e-30), max(v[-1], 1e-30)
                # orders of magnitude the gradient loses from the last step back to the first
                summary[f"{label} {k}: orders lost"] = round(_log10(last / first), 2)
                summary[f"{label} {k}: decay/step"] = round(decay_per_step(v), 4)
        emit(summary, as_json)


def _log10(x: float) -> float:
    import math

    return math.log10(x)


@app.command("ablation")
def ablation_cmd(
    tasks: Annotated[str, typer.Option(
        "--tasks", help="Comma-separated: adding, copy, temporal-order, agreement, charlm.")] =
    "adding,copy,temporal-order,agreement",
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated registry cells.")] = "",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per (task, variant).")] = 3,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per run.")] = 2000,
    length: Annotated[str | None, typer.Option(
        "--length", help="T per task, e.g. 'adding=100,copy=50' or one number for all.")] = None,
    hidden: Hidden = 64,
    jobs: Annotated[int, typer.Option("--jobs", help="Parallel processes.")] = 2,
    out: Annotated[Path | None, typer.Option("--out", help="Output directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
    debug: Annotated[bool, typer.Option("--debug")] = False,
) -> None:
    """Run every (task, variant, seed) in parallel processes; table of mean +- std and gate-importance ranking."""
    with user_errors(debug):
        from ..analysis.ablation import DEFAULT_VARIANTS, parse_lengths, run_grid

        names = [v.strip() for v in variants.split(",") if v.strip()] or list(DEFAULT_VARIANTS)
        task_names = [t.strip() for t in tasks.split(",") if t.strip()]
        summary = run_grid(task_names, names, seeds=seeds, steps=steps, lengths=parse_lengths(length, task_names),
                           hidden=hidden or 64, jobs=jobs, out_dir=out or Path("runs") / "ablation", quiet=quiet)
        emit(summary if as_json else {"table": summary["table_path"], "json": summary["json_path"],
                                      "ranking": ", ".join(summary["ranking"].get("overall", []))}, as_json)
