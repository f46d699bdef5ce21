"""The verbs that change an edit pack without refitting it: add and remove (docs/living-edits.md)."""

from __future__ import annotations

from pathlib import Path

from .common import add_data_args, add_model_args, add_processes_arg, add_verb, load_data, load_pack, load_pool
from .options import add_living_flags, living_config
from .types import id_list


def add_add(sub) -> None:
    p = add_verb(
        sub, "add", "add edits to an edit pack without refitting it",
        "Fit the new edits' neurons (stage A, with the pack's settings), add their prompts to the router "
        "(its epsilon kept unless --recalibrate) and fine-tune the generator from its weights on them with the "
        "pack's edits replayed beside them; write the grown pack to --out. An edit whose case id or prompt the "
        "pack holds is replaced (the later fact wins). Steps are cached under --work-dir: a killed run resumes. "
        "Packs with the entropy router cannot grow: refit them.",
    )
    p.add_argument("pack", type=Path, help="edit pack folder")
    add_data_args(p, "add the first N records (after --offset)", formats=False)
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="pseudo-edit pool for the new edits' other wordings and --recalibrate (default: the records "
                   "of --data after the added ones when --limit is given, else none)")
    _common(p)
    add_processes_arg(p)
    add_living_flags(p)
    p.set_defaults(run=run_add)


def run_add(args) -> int:
    from ..living import add_edits
    from ..pack import check_pack_target

    check_pack_target(args.out)  # before any work, not after it
    config = living_config(args)
    kind, path, requests, _ = load_data(args)
    pool = load_pool(args, kind, path)[1] if args.pseudo or args.limit is not None else None
    edited = load_pack(args)
    grown = add_edits(edited, requests, _work_dir(args), pool=pool, config=config, progress=args.progress,
                      processes=args.processes)
    grown.save_pretrained(args.out)
    h = grown.history[-1]
    print(f"added {len(h['ids'])} edits ({len(h['replaced'])} replacing edits the pack held; fit success "
          f"{h['fit']['success_rate']:.1f}%): {h['n_before']} -> {h['n_after']} edits, epsilon {h['epsilon']:.3f}, "
          f"generator {h['generator']['steps']} steps, {h['seconds']:.0f} s -> {args.out}")
    return 0


def add_remove(sub) -> None:
    p = add_verb(
        sub, "remove", "remove edits from an edit pack without refitting it",
        "Drop the edits' rows from the router (their prompts stop firing at once) and fine-tune the generator "
        "from its weights on the remaining edits, for a number of steps proportional to the edits removed; "
        "write the smaller pack to --out.",
    )
    p.add_argument("pack", type=Path, help="edit pack folder")
    p.add_argument("--ids", type=id_list, required=True, metavar="ID[,ID...]", help="case ids of the edits to remove")
    _common(p)
    add_living_flags(p, skip=("replay", "recalibrate"))
    p.set_defaults(run=run_remove)


def run_remove(args) -> int:
    from ..living import remove_edits
    from ..pack import check_pack_target

    check_pack_target(args.out)
    config = living_config(args)
    smaller = remove_edits(load_pack(args), args.ids, _work_dir(args), config=config, progress=args.progress)
    smaller.save_pretrained(args.out)
    h = smaller.history[-1]
    print(f"removed {len(h['ids'])} edits: {h['n_before']} -> {h['n_after']} edits, generator "
          f"{h['generator']['steps']} steps, {h['seconds']:.0f} s -> {args.out}")
    return 0


def _common(p) -> None:
    add_model_args(p, None, pack=True)
    p.add_argument("--out", type=Path, required=True,
                   help="the changed pack's folder (only an earlier pack is replaced; PACK itself may be)")
    p.add_argument("--work-dir", type=Path, default=None, help="step cache (default: OUT.work)")


def _work_dir(args) -> Path:
    return args.work_dir or args.out.with_name(args.out.name + ".work")
