"""memoir bench's summary: ratios to the baseline measured in the same run, bandwidth shares."""
import json

from memoir import bench


def raw_record():
    def row(name, group, t, **extra):
        return {"name": name, "group": group, "stats": {"min": t, "median": t * 1.1, "rounds": 5}, "extra_info": extra}
    return {"machine_info": {"memoir": {"cpu": "test cpu"}}, "datetime": "2026-12-03", "benchmarks": [
        row("read", "bandwidth", 0.01, kind="read", gb_s=10.0),
        row("memoir", "retrieval n=1", 0.002, impl="memoir", gb_s=5.0, baseline=False),
        row("numpy", "retrieval n=1", 0.006, impl="numpy", gb_s=1.7, baseline=True),
        row("faiss", "retrieval n=1", 0.001, impl="faiss", gb_s=10.0, baseline=True),
        row("plain", "layer decode", 0.001, memory="plain", baseline=True),
        row("private", "layer decode", 0.004, memory="private", baseline=False),
    ]}


def test_ratios_are_against_each_baseline_of_the_group(tmp_path):
    s = bench.summarise(raw_record())
    memoir_row = next(r for r in s["groups"]["retrieval n=1"] if r["impl"] == "memoir")
    assert memoir_row["speedup_vs"] == {"numpy": 3.0, "faiss": 0.5}
    assert memoir_row["share_of_read_bandwidth"] == 0.5
    layer = next(r for r in s["groups"]["layer decode"] if r["memory"] == "private")
    assert layer["speedup_vs"] == {"plain": 0.25}
    assert all("speedup_vs" not in r for rows in s["groups"].values() for r in rows if r.get("baseline"))
    bench.plot(s, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    json.dumps(s)  # JSON-ready
