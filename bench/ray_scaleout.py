"""Benchmark (not a test): `report --paper-set` shards serially vs on a local Ray cluster of 1 and 2 CPUs.

    synthetic VQA test images --written in GQA's release layout--> questions JSON + images/
    shipped default model --build_levels--> vision.fp32.onnx + language.<level>.gguf (cached in --out)
    shards (one cell, --shard-size items each) --run_serial | run_ray(num_cpus=1) | run_ray(num_cpus=2)
    print seconds of the shard phase (cluster start not counted; worker start and model loading are)
    and the speed-up against serial; the three must give the same predictions

Run from the repository root (needs the `ray` extra):

    .venv/bin/python bench/ray_scaleout.py --images 16 --shard-size 8 --language Q8_0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def write_gqa(folder: Path, n_images: int) -> Path:
    from tinygptv_edge.export.train import vqa

    (folder / "images").mkdir(parents=True, exist_ok=True)
    questions, names = {}, {}
    for image, question, answer, qtype in vqa.iter_vqa("test", n_images, seed=0):
        if id(image) not in names:
            names[id(image)] = f"s{len(names):05d}"
            image.save(folder / "images" / f"{names[id(image)]}.jpg", format="JPEG", quality=95)
        questions[str(len(questions))] = {"imageId": names[id(image)], "question": question, "answer": answer,
                                          "types": {"structural": qtype}}  # fmt: skip
    path = folder / "synthetic_questions.json"
    path.write_text(json.dumps(questions))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="synthetic images (about 5 questions each)")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--language", default="F32", help="language level (the reference F32 is built too)")
    ap.add_argument("--out", default="dist/bench-ray")
    args = ap.parse_args()

    import ray

    from tinygptv_edge.calib.paper_report import build_levels
    from tinygptv_edge.calib.paper_sets import load_paper_set
    from tinygptv_edge.calib.paper_sets.executor import run_ray, run_serial
    from tinygptv_edge.calib.paper_sets.runner import RunSpec, make_shards
    from tinygptv_edge.calib.report_run import ReportConfig

    out = Path(args.out)
    pset = load_paper_set("gqa", write_gqa(out / "gqa", args.images))
    cfg = ReportConfig(out=str(out), vision="fp32", language=args.language, n_calib=8, probe=False)
    arts, _ = build_levels(cfg, lambda *_: None)
    spec = RunSpec({"fp32": arts["vision"]["fp32"]["path"]},
                   {args.language: arts["language"][args.language]["path"]}, threads=1)  # fmt: skip
    shards = make_shards({"gqa": len(pset.items)}, [("fp32", args.language)], args.shard_size)
    sets = {"gqa": pset}
    n, k = len(pset.items), len(shards)
    print(f"{n} questions, {k} shards of <= {args.shard_size} items, cell fp32 + {args.language}")

    t = time.perf_counter()
    serial = run_serial(shards, sets, spec)
    times = {"serial": time.perf_counter() - t}
    for cpus in (1, 2):
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
        try:
            t = time.perf_counter()
            got = run_ray(shards, sets, spec)
            times[f"ray {cpus} worker(s)"] = time.perf_counter() - t
        finally:
            ray.shutdown()
        assert got == serial, f"ray with {cpus} CPU(s) gave other predictions than the serial run"
    for name, s in times.items():
        print(f"{name:>18}: {s:7.1f} s   speed-up vs serial {times['serial'] / s:4.2f}x")


if __name__ == "__main__":
    main()
