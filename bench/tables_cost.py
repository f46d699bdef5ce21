"""The tables of what MeG costs: its stages' times and inference cost, each stage's throughput, the
evaluation, stage A's speed, scale and wordings, the whole job as a user runs it, processes against
threads, and speed-ups timed between two revisions. bench/update_readme.py writes them into the docs."""

from __future__ import annotations

from scale_curve import current, meg_stage_seconds, method_label  # noqa: E402 (bench/ is this folder)
from tables_common import METRICS, load as _load, load_records, revisions, table as _table  # noqa: E402


def meg_cost_table() -> str:
    """MeG's per-stage fit times and its inference cost next to the unedited model."""
    rows = []
    for r in _load("meg-*.json"):
        t, c = meg_stage_seconds(r)[0], r["inference"]
        cells = [r["data"].split(":")[0], str(r["n"]), method_label(r), f"{r['fit']['fit']['success_rate']:.1f}",
                 f"{t['A']:.0f}", f"{t['BC']:.0f}", f"{t['D']:.0f}",
                 f"{r['edit']['epsilon']:.3f}"]
        if c is None:  # a scale-curve point: not timed (bench/meg.py --no-speed)
            cells += ["—"] * 8
        else:
            cells += [str(c["n_queries"]), f"{c['qps_base']:.1f}", f"{c['qps_edited']:.1f}", f"{c['ratio']:.2f}",
                      f"{c['token_ratio']:.2f}" if "token_ratio" in c else "—", f"{100 * c['route_share']:.1f}%",
                      f"{100 * c['generate_share']:.1f}%", f"{100 * c['familiar_share']:.0f}%"]
        rows.append(cells)
    return _table(["data", "N", "method", "fit success %", "A s", "B+C s", "D s", "epsilon", "timed queries", "base q/s",
                   "edited q/s", "q/s ratio", "tokens/s ratio", "time routing", "time generating", "queries routed to the edit"], rows)


def meg_throughput_table() -> str:
    """Each MeG stage's throughput on the CounterFact scale runs: edits/s of stage A (fit), B+C
    (encoder, router), D (generator) and queries/s of the evaluation, with the thread count."""
    rows = []
    for r in sorted(_load("meg-cf*.json"), key=lambda r: (r["edits_applied"], method_label(r))):
        if r["data"].split(":")[0] != "counterfact" or r["model"] != "smollm2" or r["n"] < 1024:
            continue
        if not current(method_label(r)) or r["config"]["fit"]["exclude_eval_templates"] != "none":
            continue
        seconds, n = meg_stage_seconds(r)[0], r["edits_applied"]
        queries, evaluation = sum(r["protocol"]["counts"].values()), r["timing"]["total_s"]
        rows.append([f"{n:,}", method_label(r), str(r["threads"])]
                    + [f"{seconds[k]:.0f} ({n / max(seconds[k], 1e-9):.1f})" for k in ("A", "BC", "D")]
                    + [f"{evaluation:.0f} ({queries / max(evaluation, 1e-9):.1f})",
                       f"{(sum(seconds.values()) + evaluation) / 3600:.2f}"])
    return _table(["N", "method", "threads", "A: fit s (edits/s)", "B+C: encoder + router s (edits/s)",
                   "D: generator s (edits/s)", "eval s (queries/s)", "fit + eval h"], rows)


def eval_cost_table() -> str:
    rows = []
    for r in _load("baseline-*-none.json"):
        t = r["timing"]
        scored = t["total_s"] - t["locality_reference_s"]
        queries = sum(r["protocol"]["counts"].values())
        rows.append([r["data"].split(":")[0], str(r["n"]), str(queries), f"{t['locality_reference_s']:.0f}",
                     f"{scored:.0f}", f"{t['total_s']:.0f}",
                     f"{100 * t['decoding_steps_s'] / max(scored, 1e-9):.0f}%"])
    return _table(["data", "N", "queries", "pre-edit reference s (once, cached)", "scored run s", "total s",
                   "share in step-by-step decoding"], rows)


def fit_speed_table() -> str:
    rows = []
    for r in _load("fit_neurons-speedup-*.json"):
        for check in ("tf", "generate"):
            naive = r.get(f"naive_{check}")  # the checks its --naive-checks ran
            if naive:
                rows.append([str(r["n"]), str(r["config"]["layer"]), check, f"{naive['seconds']:.0f}",
                             f"{naive['success_rate']:.1f}", f"{r['batched']['seconds']:.0f}",
                             f"{r['batched']['success_rate']:.1f}", f"{naive['speedup']:.1f}x"])
    return _table(["N", "layer", "naive loop's success test", "naive s", "naive success %", "batched s",
                   "batched success %", "speed-up"], rows)


def fit_scale_table() -> str:
    rows = []
    for r in _load("fit_neurons-scale-*.json"):
        m = r["fitted_vector_eval"]["metrics"]
        rows.append([str(r["n"]), str(r["config"]["layer"]), f"{r['success_rate']:.1f}", f"{r['median_steps']:.0f}",
                     f"{r['fit_s']:.0f}", f"{r['edits_per_s']:.2f}", f"{r['projected_10k_s'] / 3600:.1f}",
                     f"{r['peak_rss_mb']:.0f}"]
                    + [f"{m[k][s]:.1f}" for k, s in METRICS])
    return _table(["N", "layer", "success %", "median steps", "fit s", "edits/s", "10K projection h", "peak RSS MB",
                   "RelAG", "RelTF", "GenAG", "GenTF", "LocAG", "LocTF"], rows)

# bench/generality.py cost names its three runs by when they were made; the table names them by what they are
_COST_ARMS = ("prompt-only stage A (revision {before}: margin 1, lr 0.1)", "pool paraphrases' code, prompt-only settings",
              "pool paraphrases' code and defaults (wordings built and fitted)")



def stage_a_cost_table() -> str:
    """Stage A's time: the prompt-only code of before, the code that fits pool paraphrases with the old
    settings, and with its defaults; one job, one after the other (bench/generality.py cost)."""
    rows = []
    for r in _load("stage-a-cost-*.json"):
        before, old_settings = (r["rows"][k]["stage_a_s"] if len(r["rows"]) > k else None for k in (0, 1))
        for arm, row in zip(_COST_ARMS, r["rows"]):
            rows.append([str(r["n"]), arm.format(before=r["before"][:7]), f"{row['mean_wordings']:.1f}",
                         f"{row['median_steps']:.0f}", f"{row['success_rate']:.1f}", f"{row['stage_a_s']:.0f}",
                         f"{row['stage_a_s'] / before:.1f}x",
                         f"{row['stage_a_s'] / old_settings:.1f}x" if old_settings else "", str(row["threads"]),
                         f"{row['load_before']:.1f} / {row['load_after']:.1f}" if "load_before" in row else "—"])
    return _table(["N", "stage A", "wordings / edit", "median steps", "success %", "s", "vs prompt-only",
                   "vs prompt-only settings", "threads", "load average before / after"], rows)


def stage_a_restart_table() -> str:
    """Stage A with and without restarting stalled edits (bench/fit_neurons.py restart)."""
    rows = []
    for r in _load("fit_neurons-restart-*.json"):
        for row in r["rows"]:
            m = row["fitted_vector_metrics"]
            restart = "never" if row["restart_steps"] is None else f"after {row['restart_steps']} steps, lr {row['restart_lr']}"
            rows.append([row["edits"], str(row["n"]), restart, f"{row['success_rate']:.1f}", f"{row['wordings_passed']:.1f}",
                         str(row["capped"]), f"{row['row_steps']:,}", f"{row['trained_rows']:,}", f"{row['seconds']:.0f}",
                         f"{m['reliability']['ag']:.1f}", f"{m['generality']['ag']:.1f}", str(r["threads"])])
    return _table(["edits", "N", "restart", "success %", "wordings passed %", "at the step cap", "steps (all edits)",
                   "wordings trained (all steps)", "s", "fitted vectors' RelAG", "GenAG", "threads"], rows)


def _stage_a_arms_table(job: str, arm_header: str, arm_of) -> str:
    """Stage A arms side by side on each edit set with their fitted vectors' chats (bench/fit_neurons.py `job`)."""
    rows = []
    for r in _load(f"fit_neurons-{job}-*.json"):
        for row in r["rows"]:
            m, chat = row["fitted_vector_metrics"], row["fitted_vector_chat"]["edited"]
            rows.append([row["edits"], str(row["n"]), arm_of(row),
                         f"{row['success_rate']:.1f}", f"{row['row_steps']:,}",
                         f"{row['trained_tokens'] + row['tested_tokens']:,}", f"{row['seconds']:.0f}",
                         f"{m['reliability']['ag']:.1f}", f"{m['generality']['ag']:.1f}",
                         *(f"{chat[k]:.1f}" for k in ("holds", "ends", "degenerate")), str(r["threads"])])
    return _table(["edits", "N", arm_header, "success %", "steps (all edits)",
                   "tokens through the upper layers", "s", "fitted vectors' RelAG", "GenAG", "chat holds target %",
                   "chat ends %", "chat degenerate %", "threads"], rows)


def stage_a_quiet_table() -> str:
    """Stage A with the neuron acting on a chat's opening or quiet there (bench/fit_neurons.py quiet)."""
    return _stage_a_arms_table("quiet", "neuron on the chat opening",
                               lambda row: "quiet" if row["quiet_chat_opening"] else "acts")


def stage_a_warm_table() -> str:
    """Stage A with every edit from the initial vector or warm-started (bench/fit_neurons.py warm)."""
    return _stage_a_arms_table("warm", "an edit starts from",
                               lambda row: "a same-answer edit's vector" if row["warm_start"] else "the initial vector")


def _code(record: dict) -> str:
    """The commit a result's code ran at (a dash where it was not recorded)."""
    return f"`{record['git']['revision'][:7]}`" if record["git"]["revision"] else "—"


def _edit_file(result: dict) -> str:
    """The file a pipeline run took its edits from (its "data" is KIND:FILE)."""
    return result["data"].split(":")[1]


def _pipeline_records() -> list[dict]:
    """The bench/pipeline.py results, by edit count, then in the order they ran."""
    return sorted(load_records("pipeline-cf-*.json"), key=lambda record: (record["result"]["n"], record["result"]["date"]))


def pipeline_table() -> str:
    """`megedit fit` + `megedit eval` as a user runs them, timed (bench/pipeline.py), with the code's revision and
    the machine's CPU and speed (one SmolLM2 forward of 16 x 32 tokens; not recorded by earlier runs)."""
    rows = []
    for record in _pipeline_records():
        r, st = record["result"], record["result"]["stages"]
        edits = _edit_file(r) + (" (resumed run)" if r["resumed"] else "")
        reference = f"{r['reference_s']:.0f}" if "reference_s" in r else "—"
        machine = r.get("machine")
        cpu = f"{machine['cpu']}{' (AVX-512)' * machine['avx512']}, {machine['forward_16x32_s']:.2f} s" if machine \
            else "—"
        rows.append([f"{r['n']:,}", edits, r["generator"], _code(record), cpu,
                     str(r["threads"]), str(r["processes"]), f"{r['load_before']:.1f}", f"{st['A']:.0f}",
                     f"{st['BC']:.0f}", f"{st['D']:.0f}", f"{r['fit_s']:.0f}", f"{r['eval_s']:.0f}", reference,
                     f"**{r['total_s'] / 60:.1f}**", f"{r['score']:.1f}", r["date"][:10]])
    return _table(["N", "edits", "generator", "code", "CPU, forward 16 x 32 s", "threads", "processes (A, eval)",
                   "load average before", "A s", "B+C s", "D s", "fit s (process)", "eval s (process)",
                   "of which pre-edit reference s", "total min", "Score", "date"], rows)


def pipeline_parts_table() -> str:
    """The finer times of the bench/pipeline.py runs that record them (stage A's hidden-state cache and fitting
    steps, with the rows and tokens those steps ran; the encoder; the chat replies of the eval)."""
    rows = []
    for record in _pipeline_records():
        r = record["result"]
        if "parts" in r:
            part = r["parts"]
            rows.append([f"{r['n']:,}", _edit_file(r), _code(record), _known(part["hidden_cache_s"], ".0f"),
                         _known(part["steps_s"], ".0f"), _known(part["trained_rows"], ","),
                         _known(part["trained_tokens"], ","),
                         f"{part['encoder_s']:.0f}", f"{part['router_s']:.0f}", f"{part['chat_reference_s']:.0f}",
                         f"{part['chat_s']:.0f}", f"{r['eval_s']:.0f}", f"{r['total_s'] / 60:.1f}"])
    return _table(["N", "edits", "code", "A: hidden-state cache s", "A: fitting steps s", "rows trained", "tokens trained",
                   "B: encoder s", "C: router s", "eval: unedited chat replies s", "eval: edited chat replies s",
                   "eval s", "total min"], rows)


def _known(value, spec: str) -> str:
    """A figure, or a dash where the run could not know it (stage A's counters of forked processes)."""
    return "—" if value is None else format(value, spec)


def processes_table() -> str:
    """One process on every thread against forked one-thread processes (bench/processes.py)."""
    rows = []
    for r in _load("processes-cf-*.json"):
        for arm in (r["one"], r["many"]):
            many = arm is r["many"]
            rows.append([f"{r['n']:,}", f"{arm['processes']} x {arm['threads_each']} thread(s)",
                         f"{arm['load_before']:.1f}", f"{arm['fit_s']:.0f}", f"{arm['eval_s']:.0f}",
                         f"{r['fit_speedup']:.2f}x" if many else "1", f"{r['eval_speedup']:.2f}x" if many else "1",
                         f"{arm['fit_success']:.1f}", f"{arm['metrics']['reliability']['ag']:.1f}",
                         f"{arm['metrics']['generality']['ag']:.1f}", f"{r['max_vector_difference']:.2g}" if many else "—"])
    return _table(["N", "processes x threads", "load average before", "stage A s", "eval s", "stage A speed-up",
                   "eval speed-up", "fit success %", "RelAG", "GenAG", "largest vector difference"], rows)


SPEEDUPS = ("speedup_vs_one_thread", "speedup_vs_two_threads")
SAME = ("same_vectors_as_one_rank_one_thread", "same_metrics_as_one_rank_one_thread")


def _yes_no(value: bool | None) -> str:
    return "—" if value is None else "yes" if value else "no"


def ranks_table() -> str:
    """bench/ranks.py: stage A and the fitted vectors' evaluation under torchrun, 1 rank against 2."""
    rows = []
    for r in _load("ranks-cf-*.json"):
        for arm in r["arms"]:
            two = arm["ranks"] == 2
            rows.append([f"{r['n']:,}", f"{arm['ranks']} x {arm['threads_each']} thread(s)",
                         f"{arm['load_before']:.1f}",
                         f"{arm['seconds']:.0f}", f"{arm['stage_a_s']:.0f}", f"{arm['eval_s']:.0f}",
                         f"{arm['metrics']['reliability']['ag']:.1f}", f"{arm['metrics']['generality']['ag']:.1f}",
                         " / ".join(f"{r[k]:.2f}x" if k in r else "—" for k in SPEEDUPS) if two else "—",
                         *(_yes_no(r.get(k)) if two else "—" for k in SAME)])
    return _table(["N", "ranks x threads", "load average before", "wall s", "stage A s", "eval s", "RelAG", "GenAG",
                   "speed-up against 1 x 1 / 1 x 2", "vectors as 1 x 1", "scores as 1 x 1"], rows)


def encoder_speed_table() -> str:
    """bench/encoder_speed.py: the sentence encoder's training and encoding at two revisions, side by side."""
    rows = []
    for record in load_records("encoder-speed.json"):
        r = record["result"]
        for key, what in (("train_s", f"stage B: one epoch, {r['pairs']:,} pairs"),
                          ("encode_s", f"encoding {r['sentences']:,} router negatives")):
            rows.append([what, revisions(record), f"{r['best']['before'][key]:.1f}", f"{r['best']['after'][key]:.1f}",
                         f"{r['speedup'][key]:.2f}x", str(record["threads"])])
    return _table(["work", "revisions (before / after)", "before s", "after s", "speed-up", "threads"], rows)
