"""The tables of edits in real use: specificity and chat per run, own facts, and the levers behind them
(bench/real_use_levers.py). bench/update_readme.py writes them into the docs."""

from __future__ import annotations

from scale_curve import method_label, threads  # noqa: E402 (bench/ is this folder)
from tables_common import load as _load, load_one, load_records, metric as _metric, table as _table  # noqa: E402


def real_use_table() -> str:
    """Specificity and chat, per result that measured them: MeG runs, baselines, own facts."""
    rows = []
    runs = _load("meg-*.json") + _load("baseline-*.json") + _load("own-facts-*.json")
    for r in sorted(runs, key=lambda r: (r.get("setting", r.get("set", r["data"])), r["n"], method_label(r))):
        if "specificity" not in r["metrics"] and not r.get("chat"):
            continue
        chat = r.get("chat") or {}
        rates = [f"{chat['edited'][k]:.1f} ({chat['base'][k]:.1f})" if chat else "—"
                 for k in ("holds", "ends", "degenerate")]
        rows.append([r.get("setting", r.get("set", r["data"])), f"{r['n']:,}", method_label(r),
                     _metric(r, "specificity", "ag"), _metric(r, "specificity", "tf"), f"{r['score']:.1f}",
                     "—" if r.get("score_all") is None else f"{r['score_all']:.1f}",
                     str(chat.get("n", "—")), *rates, threads(r)])
    return _table(["data", "N", "method", "SpecAG", "SpecTF", "Score", "Score (8)", "chats",
                   "holds target % (base)", "ends % (base)", "degenerate % (base)", "threads"], rows)


def own_facts_table() -> str:
    """bench/own_facts.py: megedit's shipped facts fitted with no pool, stage A's success and cost beside the scores."""
    rows = []
    for r in sorted(_load("own-facts-*.json"), key=lambda r: r["set"]):
        chat = [f"{r['chat']['edited'][k]:.1f}" for k in ("holds", "ends", "degenerate")]
        subjects = "" if r["config"].get("infer_subjects", True) else " (fitted without inferred subjects)"
        rows.append([r["set"] + subjects, str(r["n"]), str(r["longest_target_tokens"]), f"{r['fit_success']:.1f}",
                     f"{r['stage_a_s_per_edit']:.1f}", *(_metric(r, k, "ag") for k in
                                                      ("reliability", "generality", "locality", "specificity")),
                     *chat, threads(r)])
    return _table(["facts", "N", "longest target (tokens)", "stage A fitted %", "stage A s per edit", "RelAG", "GenAG",
                   "LocAG", "SpecAG", "chat holds target %", "chat ends %", "chat degenerate %", "threads"], rows)


def levers_routing_table() -> str:
    """bench/real_use_levers.py, routing: which queries fire an edit under each lever."""
    return _levers_fire_table("routing", ["setup", "encoder hard negatives", "router negatives + plain",
                                          "an edit's wordings", "epsilon"], lambda r: [
        r["label"], str(r["hard_negatives"]), f"{r['negatives']} + {r['plain_negatives']}",
        "prompt and other wordings" if r["wordings"] else "prompt", f"{r['epsilon']:.3f}"])


def levers_answers_table() -> str:
    """bench/real_use_levers.py, answers: the answer's end token and the chat wording."""
    levers = load_one("real-use-levers.json")
    if levers is None or "answers" not in levers:
        return "(not run yet: bench/real_use_levers.py answers)"
    rows = []
    for r in levers["answers"]["rows"]:
        chat = [f"{r['chat'][k]:.1f}" for k in ("holds", "ends", "degenerate")]
        if r["stop"] == "base model":
            rows.append(["base model", "—", "—", "—", "—", *chat, "—", "—"])
            continue
        rows.append([r["stop"], "yes" if r["chat_wording"] else "no", f"{r['fit_s']:.0f}", f"{r['median_steps']:g}",
                     f"{r['success_rate']:.1f}", *chat, f"{r['free_generation_degenerate']:.1f}", f"{r['rel_ag']:.1f}"])
    return _table(["answer ends with", "chat wording", "stage A s", "median steps", "fitted %", "chat holds target %",
                   "chat ends %", "chat degenerate %", "50 free tokens degenerate %", "RelAG"], rows)


def levers_costs_table() -> str:
    """bench/real_use_levers.py, costs: the chat wording's cost beside the other wordings, and cheaper forms."""
    levers = load_one("real-use-levers.json")
    if levers is None or "costs" not in levers:
        return "(not run yet: bench/real_use_levers.py costs)"
    rows = [[r["label"], f"{r['fit_s']:.0f}", f"{r['median_steps']:g}", f"{r['rel_ag']:.1f}", f"{r['gen_ag']:.1f}",
             *(f"{r['chat'][k]:.1f}" for k in ("holds", "ends", "degenerate"))]
            for r in levers["costs"]["rows"]]
    return _table(["stage A setting", "stage A s", "median steps", "RelAG", "GenAG", "chat holds target %",
                   "chat ends %", "chat degenerate %"], rows)


def levers_chat_answer_table() -> str:
    """bench/real_use_levers.py, chat-answer: the chat wording's answer bare or after a space."""
    levers = load_one("real-use-levers.json")
    if levers is None or "chat_answer" not in levers:
        return "(not run yet: bench/real_use_levers.py chat-answer)"
    rows = [[r["edits"], str(r["n"]), "after a space" if r["chat_answer_space"] else "bare", f"{r['fit_s']:.0f}",
             f"{r['median_steps']:g}", f"{r['success_rate']:.1f}", f"{r['rel_ag']:.1f}", f"{r['gen_ag']:.1f}",
             *(f"{r['chat'][k]:.1f}" for k in ("holds", "ends", "degenerate")),
             f"{r['chat_target_alone']:.1f}", f"{r['chat_target_after_words']:.1f}"]
            for r in levers["chat_answer"]["rows"]]
    return _table(["edits", "N", "chat wording's answer", "stage A s", "median steps", "fitted %", "RelAG", "GenAG",
                   "chat holds target %", "chat ends %", "chat degenerate %", "reply is the target alone %",
                   "reply holds the target after other words %"], rows)


def levers_margin_table() -> str:
    """bench/real_use_levers.py, margin: the router's negative margin on bench/meg.py's edit sets."""
    return _levers_fire_table("margin", ["edits", "N", "negative margin"], lambda r: [
        r["edits"], f"{r['n_edits']:,}", f"{r['negative_margin']:g}"])


def levers_calibration_table() -> str:
    """bench/real_use_levers.py, calibration: epsilon from a mirror of prompts alone or of every wording,
    under a weight on false fire."""
    return _levers_fire_table("calibration", ["edits", "N", "calibration mirror holds", "false-fire weight",
                                              "epsilon"], lambda r: [
        r["edits"], f"{r['n_edits']:,}", "every wording" if r["calibration_wordings"] else "prompts",
        f"{r.get('false_fire_weight', 1.0):g}", f"{r['epsilon']:.3f}"])


def levers_neighbours_table() -> str:
    """bench/real_use_levers.py, neighbours: router negatives asking an edit's relation about other subjects."""
    return _levers_fire_table("neighbours", ["edits", "N", "same-relation negatives per edit", "negatives in all"],
                              lambda r: [r["edits"], f"{r['n_edits']:,}", str(r["same_relation_negatives"]),
                                         f"{r['n_negatives']:,}"])


def levers_unknown_table() -> str:
    """bench/real_use_levers.py, unknown: the extra margin of the negatives of edits of unknown relation."""
    return _levers_fire_table("unknown", ["edits", "N", "relations", "extra margin", "negatives with it"],
                              lambda r: [r["edits"], f"{r['n_edits']:,}", "hidden" if r["pool_blind"] else "as known",
                                         f"{r['unknown_relation_margin']:g}",
                                         f"{r['n_unknown_relation_negatives']:,}"])


def levers_plain_table() -> str:
    """bench/real_use_levers.py, plain: the extra margin of the plain negatives."""
    return _levers_fire_table("plain", ["edits", "N", "plain margin"],
                              lambda r: [r["edits"], f"{r['n_edits']:,}", f"{r['plain_margin']:g}"],
                              ["plain prompts about the subject fire %", "subject questions fire %"],
                              lambda r: [f"{r['plain']['fires']:.1f}", f"{r['questions']['fires']:.1f}"],
                              order=lambda r: SETS.index(r["edits"]))


def levers_gate_table() -> str:
    """bench/real_use_levers.py, gate: the question gate's thresholds, each edit set with its edits' own questions
    as fitted (one threshold for every edit, then the defaults' pair), and the two CounterFact sets blind (each
    edit's prompt alone: the lone threshold at work, under the gate's 0.4)."""
    def shown(r) -> bool:
        if not r["blind"]:
            return r["question_gate_lone"] == r["question_gate"] or r["question_gate_lone"] == 0.2
        return r["edits"] != "zsre" and r["question_gate"] in (None, 0.4)  # ZsRE's edits have their prompt alone

    def gate(r) -> str:
        if r["question_gate"] is None:
            return "off"
        lone = "" if r["question_gate_lone"] == r["question_gate"] else f", lone {r['question_gate_lone']:g}"
        return f"{r['question_gate']:g}{lone}"

    return _levers_fire_table("gate", ["edits", "N", "each edit's questions", "question gate"], lambda r: [
        r["edits"], f"{r['n_edits']:,}", "prompt alone" if r["blind"] else f"as fitted ({r['lone_edits']:,} alone)",
        gate(r)], ["plain prompts about the subject fire %", "subject questions fire %", "free-form questions fire %"],
        lambda r: [f"{r[k]['fires']:.1f}" for k in ("plain", "questions", "free_form")],
        order=lambda r: (SETS.index(r["edits"]), r["blind"]), keep=shown)


def levers_gated_margins_table() -> str:
    """bench/gated_margins.py: the negatives' extra margins with the question gate behind them."""
    record = load_one("gated-margins.json")
    if record is None:
        return "(not run yet: bench/gated_margins.py)"
    rows = []
    for r in sorted(record["rows"], key=lambda r: SETS.index(r["edits"])):
        gate = "off" if r["question_gate"] is None else f"{r['question_gate']:g}, lone {r['question_gate_lone']:g}"
        rows.append([r["edits"], f"{r['n_edits']:,}", "hidden" if r["blind"] else "as known",
                     f"{r['unknown_relation_margin']:g}", f"{r['plain_margin']:g}", gate,
                     f"{r['rephrase']['fires_own_edit']:.1f}",
                     *(f"{r[k]['fires']:.1f}" for k in ("specificity", "locality", "plain", "questions", "free_form"))])
    return _table(["edits", "N", "relations", "unknown-relation margin", "plain margin", "question gate"]
                  + FIRE_HEADER + ["plain prompts about the subject fire %", "subject questions fire %",
                                   "free-form questions fire %"], rows)


def levers_wordings_table() -> str:
    """bench/real_use_levers.py, wordings: an edit's other-relation negatives, and the mean firing of
    bench/subject_probes.py's questions about its subject, grouped by where the question stands."""
    groups = ("probe", "not in the pool", "negative")

    def near(row, group) -> str:
        rates = [row[q]["fires_own_edit"] for q, where in row["questions"].items() if where == group
                 and q != "Tell me about {}."]
        return f"{sum(rates) / len(rates):.1f} ({len(rates)})" if rates else "—"  # the mean, and over how many

    return _levers_fire_table("wordings", ["edits", "N", "other-relation negatives", "negatives in all"], lambda r: [
        r["edits"], f"{r['n_edits']:,}", negatives_label({
            "negatives": r["relations"], "negative_wordings": r["wordings"],
            "other_relation_margin": r["other_relation_margin"]}), f"{r['n_negatives']:,}"],
        ["near questions fire own %: probe-half pool wordings (questions)", "written for the bench (questions)",
         "negative-half pool wordings (questions)"], lambda r: [near(r, g) for g in groups],
        order=lambda r: SETS.index(r["edits"]))


SETS = ("counterfact", "counterfact-swap", "zsre")  # bench/meg.py's edit sets, in the order tables show them


def levers_misses_table() -> str:
    """bench/real_use_levers.py, misses: what becomes of each edit's first rephrase, per edit set."""
    levers = load_one("real-use-levers.json")
    if levers is None or "misses" not in levers:
        return "(not run yet: bench/real_use_levers.py misses)"
    rows = sorted(levers["misses"]["rows"], key=lambda r: SETS.index(r["edits"]))
    reasons = list(dict.fromkeys(reason for r in rows for reason in r["reasons"]))
    return _table(["edits", "N", *(f"{reason} %" for reason in reasons)],
                  [[r["edits"], f"{r['n_edits']:,}", *(f"{r['reasons'].get(reason, 0.0):.1f}" for reason in reasons)]
                   for r in rows])


FIRE_HEADER = ["rephrases fire their edit %", "specificity probes fire %", "locality prompts fire %"]


def _levers_fire_table(part: str, header: list[str], lead, tail_header: list[str] = (), tail=lambda r: [],
                       order=None, keep=lambda r: True) -> str:
    """A part of bench/real_use_levers.py's result as a table: each row's own columns (`lead`), then
    the three query kinds' firing rates, then any more (`tail`); rows in file order, or sorted by `order`."""
    levers = load_one("real-use-levers.json")
    if levers is None or part not in levers:
        return f"(not run yet: bench/real_use_levers.py {part})"
    rows = [r for r in levers[part]["rows"] if keep(r)]
    rows = sorted(rows, key=order) if order else rows
    rows = [lead(r) + [f"{r['rephrase']['fires_own_edit']:.1f}", f"{r['specificity']['fires']:.1f}",
                       f"{r['locality']['fires']:.1f}"] + tail(r) for r in rows]
    return _table(header + FIRE_HEADER + list(tail_header), rows)


def negatives_label(router: dict) -> str:
    """A pack's other-relation router negatives, from its router config (packs made before the wordings
    and margin settings held one wording of each of `negatives` relations, with no margin)."""
    relations = "every relation" if router["negatives"] is None else f"{router['negatives']} relations"
    wordings = router.get("negative_wordings", 1)  # absent: a pack of before the setting
    each = "every wording" if wordings is None else f"{wordings} wording{'s' if wordings > 1 else ''} each"
    margin = router.get("other_relation_margin", 0.0)
    return f"{relations}, {each}" + (f", margin {margin:g}" if margin else "")


def subject_probes_table() -> str:
    """bench/subject_probes.py: questions about each edit's subject, of relations near many edits' relations."""
    rows = []
    for record in load_records("subject-probes-*.json"):
        r, negatives = record["result"], negatives_label(record["method"]["config"]["routing"]["router"])
        for row in r["rows"]:
            where = "no" if not row["pool_wording"] else f"yes, {row['half']} half" if "half" in row else "yes"
            rows.append([negatives, f"{r['n_edits']:,}", f"`{row['question']}`", where,
                         "—" if row["relation"] is None else str(row["relation"]), f"{row['n']:,}",
                         f"{row['fires_own']:.1f}", f"{row['fires_any']:.1f}", str(row["n_answers"]),
                         f"{row['answer_changed']:.1f}"])
    return _table(["other-relation negatives", "edits", "question (subject in {})", "pool wording", "relation",
                   "asked (edits of other relations)",
                   "fires its subject's edit %", "fires any edit %",
                   "answers compared", "answer changed %"], rows)


def subjects_table() -> str:
    """bench/subjects.py: the subject taken from a prompt against the one the data gives, per file."""
    r = load_one("subjects.json")
    if r is None:
        return "(not measured yet: `.venv/bin/python bench/subjects.py`)"
    rows = [[name, f"{row['records']:,}", *(f"{row[k]:.1f}" for k in ("exact", "part", "other", "none"))]
            for name, row in r["files"].items()]
    return _table(["file", "records with a subject", "same subject %", "part of it %", "another span %",
                   "none found %"], rows)
