"""The two router kinds side by side on the same embeddings (the tuned encoder of
`bench/routing.py SETTING`): how well each separates the edits' rephrases from their locality
prompts (AUROC over all pairs), and the recall / false fire at the epsilon each calibrates on the
pool. The entropy router is trained with several epoch budgets (early stop at the default mean
entropy still applies).

    .venv/bin/python bench/router_kinds.py counterfact --entropy-epochs 100,300
    .venv/bin/python bench/router_kinds.py zsre-split

Results: bench/results/router_kinds-<cf|zs-...>.json (bench/update_readme.py shows them).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from result_names import tag  # noqa: E402
from result_schema import write_result  # noqa: E402
from routing import SETTINGS, data_files  # noqa: E402  (the same edit sets and pools)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--entropy-epochs", default="100,300")
    args = parser.parse_args()

    from megedit.cli import build_parser
    from megedit.cli.common import load_data, load_pool  # read --data / --pseudo as fit-router does
    from megedit.models import load_encoder
    from megedit.stages.encoder import load_encoder_delta
    from megedit.stages.router import RouterConfig, route_stats, router_kind, separation_auroc, train_router
    from megedit.stages.routing import RoutingConfig, calibration_embeddings, split_for_edits

    cli = build_parser().parse_args(["fit-router", *SETTINGS[args.setting], "--out", "unused"])
    kind, path, edits, _ = load_data(cli)
    pool_name, pool = load_pool(cli, kind, path)
    delta = HERE / "results" / "cases" / f"routing-{args.setting}" / "encoder.safetensors"
    if not delta.exists():
        print(f"{delta} is missing: run bench/routing.py {args.setting} first", file=sys.stderr)
        return 1
    encoder, _ = load_encoder_delta(delta, load_encoder("minilm"))
    train_pool, calibration = split_for_edits(edits, pool, RoutingConfig())
    calib = calibration_embeddings(encoder, calibration, train_pool)
    prompts = encoder.encode([r.prompt for r in edits])
    groups = {"rephrase": encoder.encode([r.rephrases[0] for r in edits]),
              "locality": encoder.encode([r.locality[0].prompt for r in edits])}
    configs = [RouterConfig(kind="nearest")] + [RouterConfig(kind="entropy", max_epochs=int(e))
                                                for e in args.entropy_epochs.split(",")]
    rows = []
    for config in configs:
        start = time.perf_counter()
        router = train_router(prompts, config, calibration=calib)
        seconds = time.perf_counter() - start
        stats = route_stats(router, groups)
        trains = router_kind(config.kind).trains  # only a trained router has an epoch budget
        rows.append({"kind": config.kind, "max_epochs": config.max_epochs if trains else None,
                     "epochs": router.record["training"].get("epochs"),
                     "auroc": separation_auroc(router.distance(groups["rephrase"]), router.distance(groups["locality"])),
                     "epsilon": router.epsilon, "calibration": router.record["calibration"]["chosen"],
                     "recall": stats["rephrase"]["familiar"], "false_fire": stats["locality"]["familiar"],
                     "seconds": seconds})
        print(f"{config.kind} ({rows[-1]['epochs']} epochs): AUROC {rows[-1]['auroc']:.3f}, recall "
              f"{rows[-1]['recall']:.1f}%, false fire {rows[-1]['false_fire']:.1f}% ({seconds:.0f} s)", flush=True)
    write_result(HERE / "results" / f"router_kinds-{tag(args.setting)}.json", {
        "setting": args.setting, "data": f"{kind}:{path.name}", "pool": pool_name, "n_edits": len(edits),
        "encoder": str(delta.relative_to(HERE.parent)), "seed": 0, "rows": rows},
        model=None, n=len(edits), seed=0, method="meg stage C (router)",
        config={"routers": [dataclasses.asdict(c) for c in configs]}, data=data_files(args.setting),
        unknown={"model.name": "the MiniLM encoder and the router only: no language model"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
