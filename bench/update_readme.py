"""Rewrite the results tables of README.md and docs/*.md from the summary JSON files in bench/results/.

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in exactly one of
those files; everything between the markers is replaced. Numbers come only from the result files.
"""

from __future__ import annotations

import re
import sys

from megedit.baselines.config import FTConfig, MemitConfig
from megedit.methods import get_method
from megedit.stages.generator import GeneratorConfig
from megedit.stages.generator.kinds import generator_kind
from scale_curve import (WEIGHT_SYMBOLS, current, edit_seconds, fitted, meg_stage_seconds, method_label,  # noqa: E402
                         threads)  # (bench/ is this script's own folder)

from result_schema import read  # noqa: E402
from tables_common import (METRICS, ROOT, RESULTS, load as _load, load_one, load_records,  # noqa: E402
                           metric as _metric, revisions, table as _table)
from tables_cost import (encoder_speed_table, eval_cost_table, fit_scale_table, fit_speed_table,  # noqa: E402
                         meg_cost_table, meg_throughput_table, pipeline_parts_table, pipeline_table, processes_table,
                         ranks_table,
                         stage_a_cost_table, stage_a_quiet_table, stage_a_restart_table, stage_a_warm_table)
from tables_summary import in_short_table  # noqa: E402
from tables_real_use import (levers_answers_table, levers_calibration_table, levers_chat_answer_table,  # noqa: E402
                             levers_costs_table, levers_gate_table, levers_gated_margins_table, levers_margin_table,
                             levers_misses_table, levers_neighbours_table, levers_plain_table, levers_routing_table,
                             levers_unknown_table, levers_wordings_table, own_facts_table, real_use_table,
                             subject_probes_table, subjects_table)


def _where(edit: dict) -> str:
    """Which layer(s) a method changed: MeG's record has a neuron spec, FT's a layer, MEMIT's and
    AlphaEdit's layers, the unedited model's none."""
    if "spec" in edit:
        return f"{edit['spec']['layer']} (neuron)"
    if edit.get("layers"):
        return f"{min(edit['layers'])}-{max(edit['layers'])}"
    return str(edit.get("layer", "—"))


def baselines_table() -> str:
    """MeG and the baselines, one row per (data, N, method); the same harness for all."""
    rows = []
    for r in _load("meg-*.json") + _load("baseline-*.json"):
        fmt = r["protocol"]["prompt_format"]["name"]
        method = method_label(r)
        edit_s = edit_seconds(r)[0]
        cells = [r["data"].split(":")[0], str(r["n"]), method, _where(r["edit"])]
        cells += [f"{r['metrics'][k][s]:.2f}" for k, s in METRICS] + [f"**{r['score']:.2f}**"]
        cells += [f"{edit_s:.0f}", f"{r['timing']['total_s']:.0f}", threads(r) or "", fmt, str(r["seed"])]
        rows.append(cells)
    return _table(["data", "N", "method", "layer", "RelAG", "RelTF", "GenAG", "GenTF", "LocAG", "LocTF", "Score",
                   "edit s", "eval s", "threads", "format", "seed"], rows)


def generator_ddp_table() -> str:
    """bench/generator_ddp.py: the generator's steps/s in one process against two under accelerate."""
    r = load_one("generator_ddp.json")
    if r is None:
        return "(not measured yet: `.venv/bin/python bench/generator_ddp.py`)"
    rows = [[setup, f"{r['width']}", f"{r['edits']:,} ({r['pairs']:,} pairs)", str(r["batch_size"]),
             ", ".join(f"{v:.1f}" for v in rates), f"{r['best'][setup]:.1f}"] for setup, rates in r["rates"].items()]
    rows.append(["speed-up (best against best)", "", "", "", "", f"**{r['speedup']:.2f}x**"])
    return _table(["setup", "MLP width", "edits", "global batch", "steps/s by round", "best steps/s"], rows)


def generator_scale_table() -> str:
    """MeG's whole pipeline on the first N CounterFact edits with each generator kind run there
    (stages A-C shared; bench/meg.py --generator)."""
    rows = []
    for r in sorted(_load("meg-cf*.json"), key=lambda r: (r["edits_applied"], method_label(r))):
        if r["model"] != "smollm2" or not current(method_label(r)) or r["n"] < 1024 \
                or r["config"]["fit"]["exclude_eval_templates"] != "none":
            continue
        g, m = r["fit"]["generator"], r["metrics"]
        size = f"{g['table_rows']:,} keys" if "table_rows" in g else f"{g['parameters'] / 1e6:.2f}M params"
        rows.append([f"{r['edits_applied']:,}", method_label(r), size, f"{meg_stage_seconds(r)[0]['D']:.0f}",
                     f"{g['best']['rel_l2']:.3f}"] + [f"{m[k][s]:.1f}" for k, s in METRICS] + [f"**{r['score']:.2f}**"])
    return _table(["N", "method", "generator size", "D s", "val rel. L2", "RelAG", "RelTF", "GenAG", "GenTF", "LocAG",
                   "LocTF", "Score"], rows)


def epsilon_whatif_table() -> str:
    """bench/epsilon_whatif.py: AG of a finished run had its router fired less (exact for AG)."""
    rows = []
    for r in _load("epsilon_whatif-*.json"):
        for row in r["rows"]:
            mark = " (the run's own)" if abs(row["epsilon"] - r["own_epsilon"]) < 1e-6 else ""
            rows.append([f"{r['n']:,}", r["generator"], f"{row['epsilon']:.3f}{mark}",
                         f"{row['pool_recall']:.1f}", f"{row['pool_false_fire']:.1f}",
                         f"{row['reliability']:.1f}", f"{row['generality']:.1f}", f"{row['locality']:.1f}"])
    return _table(["N", "generator", "epsilon", "pool recall %", "pool false fire %", "RelAG", "GenAG", "LocAG"], rows)


def router_ceiling_table() -> str:
    """bench/router_ceiling.py: the threshold each false-fire ceiling picks, per setting and N."""
    result = load_one("router_ceiling.json")
    if result is None:
        return "(not measured yet: `.venv/bin/python bench/router_ceiling.py`)"
    runs = result["runs"]
    ceilings = [c["ceiling"] for c in runs[0]["choices"]]
    rows = [[r["setting"], f"{r['n']:,}"] + [f"{c['epsilon']:.3f} ({c['recall']:.1f} / {c['false_fire']:.1f})"
                                             for c in r["choices"]] for r in runs]
    return _table(["setting", "N"] + ["no ceiling" if c is None else f"ceiling {c:g}%" for c in ceilings], rows)


def generality_levers_table() -> str:
    """Stage A settings -> the Generality the fitted vectors carry on their own, and their cost
    (fit time relative to the first row of the same run, side by side)."""
    rows = []
    for r in _load("generality-levers-*.json"):
        base = r["rows"][0]["fit_s"]
        for row in r["rows"]:
            m = row["metrics"]
            rows.append([str(r["n"]), r["edits"].removesuffix(".json"), r["exclude_eval_templates"], row["setting"],
                         f"{row['mean_wordings']:.1f}", f"{row['median_steps']:.0f}", f"{row['fit_s']:.0f}",
                         f"{row['fit_s'] / base:.1f}x"] + [f"{m[k][s]:.1f}" for k, s in METRICS[:4]])
    return _table(["N", "edits", "held-out wordings", "stage A setting", "wordings / edit", "median steps", "fit s",
                   "cost", "RelAG", "RelTF", "GenAG", "GenTF"], rows)


def _setting(r: dict) -> str:
    """A run's data setting: bench/meg.py names it (counterfact-swap is one), a baseline's is its data's kind."""
    return r["setting"] if fitted(r["method"]) else r["data"].split(":")[0]


def headline_table() -> str:
    """MeG with the defaults (each data setting and N; the MLP generator beside it up to 1,024) and
    the baselines at 1,024 and 10,000 CounterFact edits. Benchmark-only variants (test wordings held
    out), settings other than the defaults and other base models are in docs/results.md's run table."""
    from megedit import MeGConfig

    rows = []
    runs = _load("meg-*.json") + _load("baseline-cf-1024-*.json") + _load("baseline-cf-10000-*.json")
    for r in sorted(runs, key=lambda r: (_setting(r), r["n"], not fitted(r["method"]), method_label(r))):
        if fitted(r["method"]) and (not current(method_label(r)) or "of before" in method_label(r)
                                     or r["n"] > 1024 and r["config"]["generator"]["kind"] != MeGConfig().generator.kind
                                     or r["edits_applied"] != r["n"]
                                     or "held out" in method_label(r) or "gemma" in method_label(r)):
            continue  # setups of before, other generators at scale, runs scoring part of their edits: docs/results.md
        cells = [_setting(r), f"{r['n']:,}", method_label(r)]
        cells += [f"{r['metrics'][k][s]:.1f}" for k, s in METRICS] + [f"**{r['score']:.1f}**"]
        cells += [_metric(r, "specificity", "ag"), _metric(r, "specificity", "tf"),
                  "—" if r["score_all"] is None else f"{r['score_all']:.1f}"]
        cells.append(f"{(edit_seconds(r)[0] + r['timing']['total_s']) / 60:.0f}")
        rows.append(cells)
    return _table(["data", "N", "method", "RelAG", "RelTF", "GenAG", "GenTF", "LocAG", "LocTF", "Score",
                   "SpecAG", "SpecTF", "Score (8)", "edit + eval min"], rows)


def layer_sweep_table() -> str:
    rows = []
    for r in _load("fit_neurons-sweep-*.json"):
        for row in r["rows"]:
            m = row["metrics"]
            rows.append([str(r["n"]), str(row["layer"]), f"{row['success_rate']:.1f}", f"{row['median_steps']}",
                         f"{row['fit_s']:.0f}"] + [f"{m[k][s]:.1f}" for k, s in METRICS])
    return _table(["N", "layer", "success %", "median steps", "fit s", "RelAG", "RelTF", "GenAG", "GenTF",
                   "LocAG", "LocTF"], rows)


def routing_table() -> str:
    rows = []
    for path in sorted(RESULTS.glob("routing-*.json")):
        r = read(path)["result"]
        c, s, t = r["config"], r["routing"], r["timing"]
        chosen = r["router_record"]["calibration"]["chosen"]
        png = path.with_suffix(".png").name
        rows.append([f"[{path.stem.removeprefix('routing-')}](bench/results/{png})", r["data"].split(":")[0],
                     str(r["n_edits"]), r["pool"].split(":")[0] if r["pool"] else "—", str(r["n_encoder_pool"]),
                     c["router"]["kind"],
                     f"{r['retrieval_top1']['frozen']:.1f}", f"{r['retrieval_top1']['tuned']:.1f}",
                     f"{r['epsilon']:.3f}", f"{chosen['recall']:.1f} / {chosen['false_fire']:.1f}",
                     f"{s['prompt']['familiar']:.1f}", f"{s['rephrase']['familiar']:.1f}",
                     f"{s['locality']['familiar']:.1f}", f"{t['encoder_s']:.0f}", f"{t['router_s']:.0f}",
                     str(c["seed"])])
    return _table(["setting (histogram)", "data", "N edits", "pool", "encoder pairs", "router",
                   "retrieval top-1 frozen %", "tuned %", "epsilon", "pool recall / false fire %",
                   "prompts fire %", "rephrases fire % (recall)", "locality fire % (false fire)",
                   "encoder s", "router s", "seed"], rows)


def router_kinds_table() -> str:
    rows = []
    for r in _load("router_kinds-*.json"):
        for row in r["rows"]:
            c = row["calibration"]
            rows.append([r["setting"], str(r["n_edits"]), row["kind"], str(row["epochs"] or "—"), f"{row['auroc']:.3f}",
                         f"{row['epsilon']:.3f}", f"{c['recall']:.1f} / {c['false_fire']:.1f}", f"{row['recall']:.1f}",
                         f"{row['false_fire']:.1f}", f"{row['seconds']:.0f}"])
    return _table(["setting", "N edits", "router", "epochs", "AUROC rephrase vs locality", "epsilon",
                   "pool recall / false fire %", "recall %", "false fire %", "build + calibrate s"], rows)


def _generator_label(row: dict) -> str:
    """The kind; for a kind sampled by diffusion (the DiT), the settings of its sampler and network."""
    if generator_kind(row["kind"]).diffusion(GeneratorConfig()) is None:
        return row["kind"]
    config, network = row["config"], row["network"]
    prediction = config["prediction"]
    parts = [config["preset"], f"edm sigma_data {config['sigma_data']:g}" if prediction == "edm" else f"{prediction}-prediction",
             "condition x sqrt(d)" if network["unit_condition"] else "raw condition",
             f"condition dropout {network['cond_dropout']:g}"]
    if network["cond_token"]:
        parts.append("condition on tokens")
    return f"dit ({', '.join(parts)})"


def generator_table() -> str:
    rows = []
    for r in _load("fit_neurons-scale-*.json"):
        m = r["fitted_vector_eval"]["metrics"]
        rows.append(["fitted vectors (stage A, upper bound)", str(r["n"]), "—", "—", "—", "—", "—", "—"]
                    + [f"{m[k][s]:.1f}" for k, s in METRICS[:4]] + ["—"])
    for r in _load("generator-*.json"):
        for row in r["rows"]:
            t, e, best = row["training"], row["eval"], row["training"]["best"]
            m = e["metrics"]
            rows.append([_generator_label(row), str(r["n"]),
                         f"{t['parameters'] / 1e6:.2f}M", str(t["steps"]), f"{t['seconds']:.0f}", str(r["threads"]),
                         f"{best['rel_l2']:.3f}", f"{best['rel_ag']:.1f}"]
                        + [f"{m[k][s]:.1f}" for k, s in METRICS[:4]] + [f"{e['generate_ms_per_query']:.2f}"])
    return _table(["vectors from", "N", "params", "train steps", "train s", "threads", "val rel. L2", "val RelAG",
                   "RelAG", "RelTF", "GenAG", "GenTF", "ms/query"], rows)


def sampling_steps_table() -> str:
    rows = []
    for r in _load("generator-*.json"):
        for row in r["rows"]:
            for g in row.get("steps_grid", []):  # diffusion kinds only
                m = g["metrics"]
                rows.append([_generator_label(row), str(row["training"]["steps"]), str(r["threads"]), str(g["n"]),
                             str(g["steps"]), f"{g['generate_ms_per_query']:.2f}"]
                            + [f"{m[k][s]:.1f}" for k, s in METRICS[:4]])
    return _table(["generator", "train steps", "threads", "N", "sampling steps", "ms/query", "RelAG", "RelTF", "GenAG", "GenTF"], rows)


def denoising_table() -> str:
    """bench/generator.py --profile: x0 error at every 4th of the 50 DDIM steps, per saved DiT; then
    the distance and RelAG of what each step count samples."""
    tables = []
    for r in _load("denoising-profile-*.json"):
        gens = r["rows"]
        header = ["t", "alpha_bar"] + [f"{_generator_label(g)}, {g['steps']} train steps" for g in gens]
        rows = []
        for i, p in enumerate(gens[0]["profile"]):
            if i % 4 == 0 or i == len(gens[0]["profile"]) - 1:
                rows.append([str(p["t"]), f"{p['alpha_bar']:.4f}"]
                            + [f"{g['profile'][i]['trajectory_rel']:.3f} / {g['profile'][i]['true_xt_rel']:.3f}" for g in gens])
        tables.append(_table(header, rows))
        rows = [[_generator_label(g), str(g["steps"]), str(r["n_validation"]), str(row["steps"]), f"{row['ms_per_query']:.2f}",
                 f"{row['rel_l2']:.3f}", f"{row['rel_ag']:.1f}"] for g in gens for row in g["sampling"]]
        if rows:
            tables.append(_table(["generator", "train steps", "N", "sampling steps", "ms/query", "rel. L2", "RelAG"], rows))
    return "\n\n".join(tables)


def scale_curve_table() -> str:
    """The points of bench/scale_curve.py: every method at every N measured so far."""
    curve = load_one("scale_curve.json")
    points = curve["points"] if curve else []
    rows = [[str(p["n"]), p["label"]] + [f"{p['metrics'][k][s]:.1f}" for k, s in METRICS]
            + [f"**{p['score']:.2f}**", f"{p['edit_time_s']:.0f}", p["edit_time_note"] or "—",
               f"{p['eval_time_s']:.0f}", p["threads"] or "—"]
            for p in sorted(points, key=lambda p: (p["n"], p["method"]))]
    return _table(["N", "method", "RelAG", "RelTF", "GenAG", "GenTF", "LocAG", "LocTF", "Score", "edit s",
                   "edit time note", "eval s", "threads"], rows)


def _ft_sweep_setup(settings: dict) -> tuple[str, str]:
    """(layers, setup) of an FT row of bench/baseline_sweep.py."""
    box = settings["norm_constraint"]
    setup = (f"Adam, {len(settings['epoch_losses'])} of {settings['epochs']} epochs (stop at loss "
             f"{settings['stop_loss']:g})" + (f", box {box:g}" if box else ""))
    return str(settings["layer"]), setup


def _memit_sweep_setup(settings: dict) -> tuple[str, str]:
    """(layers, setup) of a MEMIT / AlphaEdit row of bench/baseline_sweep.py."""
    stop = f"loss < {settings['v_tol']:g}" if "v_tol" in settings else "all steps"  # runs before v_tol
    cov = "model text" if "model wrote" in settings["cov_source"] else "pool prompts"
    setup = (f"cov: {cov} ({settings['cov_tokens'] // 1000}K tok); {settings['context_prefixes']} prefixes; "
             f"KL {settings['kl_factor']:g}; values {settings['v_steps']} steps, {stop}")
    return f"{min(settings['layers'])}-{max(settings['layers'])}", setup


# a sweep row's setup, by the settings class its method uses (megedit.methods: Method.config)
_SWEEP_SETUPS = {FTConfig: _ft_sweep_setup, MemitConfig: _memit_sweep_setup}


def _sweep_setup(row: dict) -> tuple[str, str, str]:
    """(weight, layers, setup) of one bench/baseline_sweep.py row."""
    method = get_method(row["method"])
    weight = f"{WEIGHT_SYMBOLS[method.main_setting]} {row['weight']:g}"
    return weight, *_SWEEP_SETUPS[method.config](row["settings"])


def causal_trace_table() -> str:
    """Per layer, the indirect effects of bench/causal_trace.py (two layers a row to keep it short)."""
    r = load_one("causal_trace-smollm2.json")
    if r is None:
        return "(not run yet: bench/causal_trace.py)"
    mlp, hidden = r["mlp_indirect_effect"], r["hidden_indirect_effect"]
    half = (len(mlp) + 1) // 2
    rows = [[str(i), f"{mlp[i]:.4f}", f"{hidden[i]:.4f}"]
            + ([str(i + half), f"{mlp[i + half]:.4f}", f"{hidden[i + half]:.4f}"] if i + half < len(mlp) else ["", "", ""])
            for i in range(half)]
    table = _table(["layer", "MLP (window)", "layer output"] * 2, rows)
    return (table + f"\n\n{r['n_facts']} known facts, p(answer) clean {r['p_clean_mean']:.3f}, corrupted "
            f"{r['p_corrupted_mean']:.3f}; MLP window {r['window']}, {r['samples']} noise draws; peak at layer "
            f"{r['mlp_peak_layer']}, suggested span {r['suggested_span'][0]}-{r['suggested_span'][-1]}; "
            f"{r['wall_s']:.0f} s on {r['torch_threads']} thread(s).")


def baseline_sweep_table() -> str:
    rows = []
    for r in _load("baseline_sweep-*.json"):
        for row in r["rows"]:
            weight, layers, setup = _sweep_setup(row)
            reused = row["settings"].get("values_reused_edits")  # FT searches no values
            edit_s = f"{row['edit_s']:.0f}" + (" (values cached)" if reused else "")
            rows.append([str(r["n"]), row["method"], weight, layers, setup]
                        + [f"{row['metrics'][k][s]:.1f}" for k, s in METRICS]
                        + [f"{row['score']:.2f}", edit_s, str(r["threads"])])
    return _table(["N", "method", "weight", "layers", "setup", "RelAG", "RelTF", "GenAG", "GenTF", "LocAG",
                   "LocTF", "Score", "edit s", "threads"], rows)


def _ags(m: dict) -> list[str]:
    """RelAG, GenAG, LocAG and the Score of one scored set."""
    return [f"{m['metrics'][k]['ag']:.1f}" for k in ("reliability", "generality", "locality")] + [f"{m['score']:.1f}"]


def living_add_table() -> str:
    """Edits added to a fitted pack against a refit of all of them (bench/living.py add, and its
    variants with other add settings, living-add-<setting>.json)."""
    rows = []
    for r in _load("living-add*.json"):
        n, k, c = r["n_pack"], r["n_new"], r["add_config"]
        added = f"+ {k} added (`megedit add`, passes {c['passes'] or 'the pack’s'}, replay {c['replay']:g})"
        if "measured_by" not in r["refit"]:  # the default run: the pack before, and the refit
            rows.append([f"{n:,}-edit pack", f"old {n:,}", *_ags(r["before_old"]), "—", ""])
        rows += [[added, f"old {n:,}", *_ags(r["after_old"]), f"{r['add']['seconds']:.0f}",
                  f"{100 * r['cost_ratio']:.1f}% of the refit"],
                 [added, f"new {k}", *_ags(r["after_new"]), "", ""]]
        if "measured_by" not in r["refit"]:
            rows += [[f"refit of all {n + k:,} (`megedit fit`, from scratch)", f"old {n:,}", *_ags(r["refit_old"]),
                      f"{r['refit']['seconds']:.0f}", "1.0x"],
                     [f"refit of all {n + k:,}", f"new {k}", *_ags(r["refit_new"]), "", ""]]
    return _table(["pack", "edits scored", "RelAG", "GenAG", "LocAG", "Score", "wall s", "cost"], rows)


def living_successive_table() -> str:
    """The old edits after each of several additions (bench/living.py successive)."""
    rows = []
    for r in _load("living-successive.json"):
        for step in r["steps"]:
            new = step.get("new")  # the first step is the pack before any addition: no batch, no time
            rows.append([str(step["added"]), f"{step['n_edits']:,}", f"{step['seconds']:.0f}" if "seconds" in step else "—",
                         str(step.get("generator_steps", "—")), *_ags(step["old"]),
                         f"{new['metrics']['reliability']['ag']:.1f}" if new else "—",
                         f"{new['metrics']['generality']['ag']:.1f}" if new else "—"])
    return _table(["additions", "edits in the pack", "add s", "generator steps", "old RelAG", "old GenAG", "old LocAG",
                   "old Score", "batch just added: RelAG", "its GenAG"], rows)


def living_lifelong_table() -> str:
    """Single-edit additions against a batch fit of the same edits (bench/living.py lifelong)."""
    rows = []
    for r in _load("living-lifelong.json"):
        fits = [("one at a time", r["lifelong"])] + ([("one batch", r["batch"])] if r["batch"] else [])
        for group in ("old", "added", "all"):
            for label, scored in fits:
                m = scored[group]
                rows.append([group if group != "old" else f"old {r['n_pack']:,}", label, f"{m['n']:,}", *_ags(m)])
    return _table(["edits scored", "fitted", "edits", "RelAG", "GenAG", "LocAG", "Score"], rows)


def living_lifelong_cost_table() -> str:
    """What one single-edit addition costs (bench/living.py lifelong, and lifelong-timing: alone)."""
    runs = [("beside the batch fit, scored every 100", r) for r in _load("living-lifelong.json")]
    runs += [("alone, nothing scored", r) for r in _load("living-lifelong-timing.json")]
    rows = [[f"{r['n_new']:,}", how, str(r["threads"]), f"{r['median_s']:.2f}", f"{r['p90_s']:.2f}",
             f"{max(r['seconds']):.1f}", f"{r['total_s'] / 60:.1f}"] for how, r in runs]
    return _table(["additions", "run", "threads", "median s", "p90 s", "max s", "total min"], rows)


def serve_load_table() -> str:
    """Edited against base model under the same concurrent load on one server (bench/serve_load.py)."""
    rows = []
    for r in _load("serve-load-*.json"):
        if r["workload"] == "mixed":
            continue  # serve_load_mixed_table
        for name in ("edited", "base"):
            m, lat = r[name], r[name]["latency_s"]
            ratio = r["ratio"]["requests_per_s"] if name == "edited" else 1.0
            rows.append([f"{r['n_edits']:,}", name, str(r["clients"]), f"{r['seconds']:.0f}", str(m["requests"]),
                         str(m["errors"]), f"{m['requests_per_s']:.2f}", f"{ratio:.2f}", f"{lat['p50']:.2f}",
                         f"{lat['p95']:.2f}", f"{m['tokens_per_s']:.1f}", f"{100 * m['edit_fired_share']:.0f}%",
                         f"{m['rows_per_batch']:.1f}", str(r["threads"])])
    return _table(["pack edits", "model", "clients", "s", "requests", "errors", "req/s", "vs base", "p50 s", "p95 s",
                   "tokens/s", "edit fired", "rows / batch", "threads"], rows)


def serve_load_mixed_table() -> str:
    """Continuous batching against the previous whole-batch worker, mixed workload (bench/serve_load.py)."""
    rows = []
    for r in _load("serve-load-*.json"):
        if r["workload"] != "mixed":
            continue
        for name, label in (("continuous", "continuous batching"), ("compared", "whole batch (previous)")):
            if name not in r:
                continue  # a run of one server
            m, mem = r[name], r[name]["memory"]
            steps = m["server"].get("steps")  # the compared worker of before counted no decode steps
            rows.append([f"{r['n_edits']:,}", str(r["clients"]), f"{r['seconds']:.0f}", str(r["threads"]), label,
                         str(m["server"]["max_batch"]), str(m["requests"]), str(m["errors"]),
                         f"{m['requests_per_s']:.2f}",
                         *(f"{part['latency_s'][q]:.2f}" for part in (m, m["short"], m["long"]) for q in ("p50", "p95")),
                         f"{m['server']['step_rows'] / steps:.1f}" if steps else "-",
                         f"{mem['start_mib']:,.0f} / {mem['end_mib']:,.0f} / {mem['peak_mib']:,.0f}"])
    return _table(["pack edits", "clients", "s", "threads", "worker", "max batch", "requests", "errors", "req/s",
                   "p50 s", "p95 s", "short p50 s", "short p95 s", "long p50 s", "long p95 s", "rows / step",
                   "memory MiB: start / end / peak"], rows)


def living_headline_table() -> str:
    """The README's rows for living edits and serving."""
    rows = []
    for r in _load("living-add.json"):  # the default settings
        change = r["old_change"]
        rows.append([f"add {r['n_new']} edits to a {r['n_pack']:,}-edit pack",
                     f"{r['add']['seconds']:.0f} s = {100 * r['cost_ratio']:.1f}% of a refit ({r['refit']['seconds']:.0f} s); "
                     f"new edits RelAG {r['after_new']['metrics']['reliability']['ag']:.1f}; old edits RelAG / GenAG / "
                     f"LocAG {change['reliability']['ag']:+.1f} / {change['generality']['ag']:+.1f} / "
                     f"{change['locality']['ag']:+.1f} points", f"{r['threads']} thread"])
    for r in _load("living-successive.json"):
        first, last = r["steps"][0]["old"], r["steps"][-1]["old"]
        rows.append([f"{r['times']} additions of {r['n_new']} to a {r['n_pack']:,}-edit pack",
                     f"old edits' Score {first['score']:.1f} -> {last['score']:.1f} (GenAG "
                     f"{first['metrics']['generality']['ag']:.1f} -> {last['metrics']['generality']['ag']:.1f})",
                     f"{r['threads']} thread"])
    alone = [f"; {t['median_s']:.1f} s alone on {t['threads']} thread{'s' * (t['threads'] > 1)} (first {t['n_new']})"
             for t in _load("living-lifelong-timing.json")]
    for r in _load("living-lifelong.json"):
        batch = f" (a batch fit of the same: {r['batch']['all']['score']:.1f})" if r["batch"] else ""
        rows.append([f"{r['n_new']:,} single-edit additions to a {r['n_pack']:,}-edit pack",
                     f"median {r['median_s']:.1f} s an addition beside another job{''.join(alone)}; Score of all "
                     f"{r['lifelong']['all']['n']:,} edits after the last {r['lifelong']['all']['score']:.1f}{batch}",
                     f"{r['threads']} thread{'s' * (r['threads'] > 1)}"])
    compared = [r for r in _load("serve-load-*.json") if "compared" in r]  # continuous batching against before
    for r in sorted(compared, key=lambda r: r["clients"] * r["seconds"])[-1:]:  # the largest such run
        now, before = r["continuous"], r["compared"]
        ratio = now["requests_per_s"] / before["requests_per_s"]
        p50 = now["latency_s"]["p50"], before["latency_s"]["p50"]
        rows.append([f"`megedit serve`, {r['clients']} clients for {r['seconds']:.0f} s, short edited and long base "
                     f"answers", f"{now['requests_per_s']:.2f} req/s = {ratio:.1f}x the previous worker's; "
                     f"p50 {p50[0]:.1f} s against {p50[1]:.1f} s; {now['errors']} failed requests",
                     f"{r['threads']} thread{'s' * (r['threads'] > 1)}"])
    return _table(["living edits and serving (SmolLM2, CounterFact)", "measured", "threads"], rows)


def same_results_table() -> str:
    """bench/same_results.py: fit + eval at two revisions, and the older pack under the newer code."""
    rows = []
    for record in load_records("same-results-cf-*.json"):
        r = record["result"]
        settings = ", ".join(f"{k.rsplit('.', 1)[1]} {v}" for k, v in r["added_since"].items())
        rows.append([f"{r['n']} CounterFact edits, pool of {r['pool']:,}", revisions(record), f"{r['queries']:,}",
                     str(len(r["fit_and_eval"])), str(len(r["old_pack_new_code"])), settings])
    return _table(["edits", "revisions (before / after)", "queries", "differing: fit + eval",
                   "differing: old pack, new code", "settings added since, at their old behaviour"], rows)


TABLES = {"headline": headline_table, "real-use": real_use_table, "subject-probes": subject_probes_table,
          "levers-routing": levers_routing_table, "in-short": in_short_table, "levers-answers": levers_answers_table,
          "levers-margin": levers_margin_table, "levers-calibration": levers_calibration_table,
          "levers-neighbours": levers_neighbours_table, "levers-unknown": levers_unknown_table,
          "levers-plain": levers_plain_table,
          "levers-gate": levers_gate_table, "levers-gated-margins": levers_gated_margins_table,
          "ranks": ranks_table,
          "levers-wordings": levers_wordings_table, "own-facts": own_facts_table, "levers-costs": levers_costs_table,
          "levers-chat-answer": levers_chat_answer_table,
          "subjects": subjects_table,
          "generality-levers": generality_levers_table, "stage-a-cost": stage_a_cost_table,
          "scale-curve": scale_curve_table, "baseline-sweep": baseline_sweep_table,
          "causal-trace": causal_trace_table, "baselines": baselines_table, "meg-cost": meg_cost_table,
          "meg-throughput": meg_throughput_table, "generator-ddp": generator_ddp_table,
          "generator-scale": generator_scale_table, "epsilon-whatif": epsilon_whatif_table,
          "router-ceiling": router_ceiling_table, "eval-cost": eval_cost_table, "fit-speed": fit_speed_table,
          "fit-scale": fit_scale_table, "layer-sweep": layer_sweep_table, "routing": routing_table,
          "router-kinds": router_kinds_table, "generator": generator_table, "sampling-steps": sampling_steps_table,
          "denoising": denoising_table, "living-add": living_add_table, "living-successive": living_successive_table,
          "living-lifelong": living_lifelong_table, "living-lifelong-cost": living_lifelong_cost_table,
          "serve-load": serve_load_table, "serve-load-mixed": serve_load_mixed_table, "pipeline": pipeline_table,
          "pipeline-parts": pipeline_parts_table,
          "processes": processes_table, "living-headline": living_headline_table,
          "same-results": same_results_table, "encoder-speed": encoder_speed_table,
          "levers-misses": levers_misses_table, "stage-a-restart": stage_a_restart_table,
          "stage-a-quiet": stage_a_quiet_table, "stage-a-warm": stage_a_warm_table}


def main() -> int:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {page: page.read_text() for page in pages}
    for name, build in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        holders = [page for page, text in texts.items() if pattern.search(text)]
        if len(holders) != 1:
            print(f"table {name}: markers found in {len(holders)} pages, expected one", file=sys.stderr)
            return 1
        table = build()
        texts[holders[0]] = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), texts[holders[0]])
    for page, text in texts.items():
        if page.read_text() != text:
            page.write_text(text)
            print(f"{page.relative_to(ROOT)}: tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
