"""The sweep on the analytic toy: settings, paired noise, resume after a kill, shards."""

import json
import warnings

import pytest
import torch

from diffblend.evaluate.backends import ToyBackend
from diffblend.evaluate.methods import MethodOptions, Setting, generate
from diffblend.evaluate.records import read_records, record_key
from diffblend.evaluate.sweep import build_settings, merge_shards, pair_grid, run_sweep, shard_path
from diffblend.baselines.code import CoDeConfig

BACKEND = ToyBackend.default(num_steps=8)
GRID = pair_grid(["right", "up"], [0.0, 0.5, 1.0])
PROMPTS, SEEDS = ["a", "b"], [0, 1, 2]
OPTS = MethodOptions(code=CoDeConfig(num_candidates=3, block_size=4))


class Killed(Exception):
    pass


def settings():
    return build_settings(["base", "mpa", "ls", "kla", "morl", "rgg", "code"], GRID, lambda_grid=[0.5, 1.5],
                          kla_weights=[{"right": 1.0}])


def test_build_settings_counts_and_refuses_duplicates():
    s = settings()
    assert len(s) == 1 + 3 + 3 + 2 + 3 + 3 + 3
    assert {x.lam for x in s if x.method == "mpa"} == {1.0}
    with pytest.raises(ValueError, match="twice"):
        build_settings(["mpa"], GRID + GRID[:1])
    with pytest.raises(ValueError, match="method must be one of"):
        build_settings(["nope"], GRID)
    with pytest.raises(ValueError, match="lambda grid"):
        build_settings(["kla"], GRID)


def test_noise_is_paired_across_settings_and_batches():
    # lambda = 0 is the base model; the same (prompt, seed) must give the same sample in any batch.
    a = generate(BACKEND, Setting.make("base"), ["a", "b"], [0, 1])
    b = generate(BACKEND, Setting.make("kla", {"right": 1.0}, 0.0), ["b"], [1])
    torch.testing.assert_close(a.x0[1:], b.x0, rtol=0, atol=1e-12)


def test_resume_after_kill_loses_nothing_and_duplicates_nothing(tmp_path):
    full = tmp_path / "full.jsonl"
    run_sweep(BACKEND, settings(), PROMPTS, SEEDS, full, options=OPTS, batch_size=4, progress=False)
    ref = {record_key(r): r for r in read_records(full)}
    assert len(ref) == len(settings()) * len(PROMPTS) * len(SEEDS)

    part = tmp_path / "part.jsonl"
    calls = {"n": 0}

    def kill_after_three(setting, recs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(BACKEND, settings(), PROMPTS, SEEDS, part, options=OPTS, batch_size=4, progress=False,
                  on_batch=kill_after_three)
    # A kill in the middle of a write leaves a partial last line.
    half = json.dumps(next(iter(ref.values())))[:37]
    with open(part, "a") as f:
        f.write(half)
    before = read_records(part)  # the partial line is skipped, not an error
    assert 0 < len(before) < len(ref)

    stats = run_sweep(BACKEND, settings(), PROMPTS, SEEDS, part, options=OPTS, batch_size=4, progress=False)
    assert stats.skipped == len(before)
    got = read_records(part)
    keys = [record_key(r) for r in got]
    assert len(keys) == len(set(keys)), "a record was written twice"
    assert set(keys) == set(ref), "a record was lost"
    assert part.read_bytes().endswith(b"\n") and half.encode() not in part.read_bytes()
    # Same noise whatever the batching: rewards agree with the uninterrupted run (float64 toy).
    for r in got:
        for k, v in r["rewards"].items():
            assert v == pytest.approx(ref[record_key(r)]["rewards"][k], abs=1e-9)


def test_shards_merge_without_duplicates(tmp_path):
    path = tmp_path / "r.jsonl"
    st = build_settings(["base", "mpa"], GRID)
    for rank in range(2):
        run_sweep(BACKEND, st, PROMPTS, SEEDS[:1], path, batch_size=2, progress=False,
                  process_index=rank, num_processes=2)
    assert shard_path(path, 0).exists() and shard_path(path, 1).exists()
    # A rerun of rank 0 finds its work done (done keys include every shard).
    again = run_sweep(BACKEND, st, PROMPTS, SEEDS[:1], path, batch_size=2, progress=False,
                      process_index=0, num_processes=2)
    assert again.generated == 0
    n = merge_shards(path)
    assert n == len(st) * len(PROMPTS) and not shard_path(path, 0).exists()
    keys = [record_key(r) for r in read_records(path)]
    assert len(keys) == len(set(keys)) == n


def test_records_have_the_fields_and_costs(tmp_path):
    path = tmp_path / "r.jsonl"
    run_sweep(BACKEND, build_settings(["base", "mpa", "code"], GRID[1:2]), ["a"], [0], path,
              options=OPTS, progress=False)
    recs = {r["method"]: r for r in read_records(path)}
    assert set(recs["base"]["rewards"]) == {"right", "up", "centre"}
    assert recs["base"]["nfe"] == 8 and recs["mpa"]["nfe"] == 16  # two active adapters at w = 0.5
    assert recs["code"]["nfe"] > 2 * recs["base"]["nfe"]
    assert all(r["seconds"] > 0 for r in recs.values())


def test_sweep_cli_on_the_toy_resumes(tmp_path):
    from diffblend.cli import main

    out = tmp_path / "rec.jsonl"
    argv = ["sweep", "--model", "toy", "--rewards", "right,up", "--weights", "0,1", "--methods", "base,mpa,kla",
            "--lambdas", "0,2", "--kla-weights", "right=1,up=0", "--prompts", "a", "--seeds", "2", "--steps", "4",
            "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    n = len(read_records(out))
    assert n == (1 + 2 + 2) * 2
    assert main(argv) == 0 and len(read_records(out)) == n  # nothing twice
    assert main(["sweep", "--model", "toy", "--rewards", "right", "-o", str(out)]) == 1  # not a pair


def test_ls_images_do_not_depend_on_their_batch():
    # LS draws are keyed on each image's own seed: the same (prompt, seed) gives the same image
    # alone or inside a batch in another order (what makes a resumed sweep reproduce its images)
    st = Setting.make("ls", {"right": 0.5, "up": 0.5})
    prompts, seeds = ["a", "b", "c", "d"], [0, 1, 2, 3]
    together = generate(BACKEND, st, prompts, seeds).x0
    apart = torch.cat([generate(BACKEND, st, [p], [s]).x0 for p, s in zip(prompts[::-1], seeds[::-1])])
    assert torch.equal(together, apart.flip(0))


def test_single_process_rerun_folds_in_the_shards_of_a_killed_parallel_run(tmp_path):
    # A parallel run killed before its merge leaves shards; a plain rerun skips their records, so it
    # must fold them into the records file (which is all the report reads) or they are lost.
    path = tmp_path / "r.jsonl"
    st = build_settings(["base", "mpa"], GRID[1:2])
    run_sweep(BACKEND, st, PROMPTS, SEEDS[:1], path, progress=False, process_index=0, num_processes=2)
    stats = run_sweep(BACKEND, st, PROMPTS, SEEDS[:1], path, progress=False)
    assert stats.skipped == len(PROMPTS) and stats.generated == len(PROMPTS)
    keys = [record_key(r) for r in read_records(path)]
    assert len(keys) == len(set(keys)) == len(st) * len(PROMPTS)
    assert not shard_path(path, 0).exists()



def test_a_repeated_prompt_or_seed_is_generated_and_recorded_once(tmp_path):
    path = tmp_path / "r.jsonl"
    stats = run_sweep(BACKEND, build_settings(["base"], GRID), ["a", "a", "b"], [0, 0], path, progress=False)
    keys = [record_key(r) for r in read_records(path)]
    assert len(keys) == len(set(keys)) == 2 and stats.generated == 2


def test_shards_are_found_and_merged_whatever_the_records_file_is_called(tmp_path):
    path = tmp_path / "run[1].jsonl"  # glob metacharacters in the name
    st = build_settings(["base", "mpa"], GRID[1:2])
    for rank in range(2):
        run_sweep(BACKEND, st, PROMPTS, SEEDS[:2], path, progress=False, process_index=rank, num_processes=2)
    assert shard_path(path, 1).exists()
    assert run_sweep(BACKEND, st, PROMPTS, SEEDS[:2], path, progress=False, process_index=1,
                     num_processes=2).generated == 0  # its shard counts as done
    assert merge_shards(path) == len(st) * len(PROMPTS) * 2 and not shard_path(path, 0).exists()


def test_rgg_and_code_on_the_toy_with_no_reward_weight_are_the_base():
    # r(w) = 0: nothing to guide or select with, so both reduce to plain sampling (same noise).
    base = generate(BACKEND, Setting.make("base"), ["a", "b"], [0, 1]).x0
    for m in ("rgg", "code"):
        out = generate(BACKEND, Setting.make(m, {"right": 0.0, "up": 0.0}), ["a", "b"], [0, 1], OPTS).x0
        assert out.shape == base.shape and torch.isfinite(out).all()
    torch.testing.assert_close(generate(BACKEND, Setting.make("rgg", {"right": 0.0, "up": 0.0}), ["a", "b"], [0, 1]).x0,
                               base, rtol=0, atol=1e-12)


def test_the_toy_names_its_rewards_when_w_names_another():
    for m in ("mpa", "morl", "rgg", "code"):
        with pytest.raises(ValueError, match=r"the toy has \['right', 'up', 'centre'\]"):
            generate(BACKEND, Setting.make(m, {"right": 0.5, "left": 0.5}), ["a"], [0], OPTS)


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    # A records file written by other code ("\n".join(json.dumps(r) ...)) ends without a newline;
    # only a cut write can leave an incomplete record, so a complete one is read and kept.
    from diffblend.evaluate.records import RecordWriter

    recs = [dict(method="base", weights=None, prompt="p", seed=s, rewards={"r": 0.1 * s}, seconds=1.0,
                 **{"lambda": None}) for s in range(3)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs[:2]))
    assert [r["seed"] for r in read_records(path)] == [0, 1]
    with RecordWriter(path) as w:
        w.write(recs[2])
    assert [r["seed"] for r in read_records(path)] == [0, 1, 2]


def test_build_settings_refuses_a_bad_blend_before_anything_runs():
    # Otherwise the sweep would run every earlier setting first and die at the bad one.
    with pytest.raises(ValueError, match=r"kla.*lambda"):
        build_settings(["base", "mpa", "kla"], GRID, lambda_grid=[0.5, -1.0])
    with pytest.raises(ValueError, match=r"mpa.*sum"):
        build_settings(["base", "mpa"], [{"right": 0.5, "up": 0.6}])


def test_ls_without_sampler_noise_says_it_is_a_heuristic():
    st = Setting.make("ls", {"right": 0.5, "up": 0.5}, 1.0)
    with pytest.warns(UserWarning, match="stochastic sampler"):
        generate(BACKEND, st, ["a"], [0], MethodOptions(eta=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(BACKEND, st, ["a"], [0], MethodOptions(eta=1.0))
