"""Teacher top-1 on the web-size CIFAR-10 test split (bench/webpool.py) by how far reduced decoding goes:
margin m = the DCT scale leaves >= m x the input size before the bilinear resize (0: full decode), with
the CPU ms per image of each decode and how many images only one side gets right. Picks
shards/decode.REDUCED_MARGIN.

    python bench/decode_margin.py "runs/webpool/cifar10_test/*.tar"
"""
import sys, time, glob, json
import multiprocessing as mp
import numpy as np
from PIL import Image

def dec(job):
    from odsd_dist.shards.tario import iter_samples
    from odsd_dist.shards.decode import open_image, upright, to_mode
    from odsd_dist.shards.decode import pick_image
    path, size, margin = job
    xs, ys = [], []
    cpu = 0.0
    for s in iter_samples(path):
        ext, data = pick_image(s)
        t0 = time.process_time()
        im = open_image(data, ext, 1 << 28, load=False)
        if margin and im.format == "JPEG" and min(im.size) >= 2 * margin * size:
            im.draft("RGB", (margin * size, margin * size))
        im.load()
        im = to_mode(upright(im), "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        cpu += time.process_time() - t0
        xs.append(a); ys.append(int(s["cls"]))
    return np.stack(xs), np.array(ys), cpu

if __name__ == "__main__":
    from odsd_dist.score.scorer import TeacherScorer
    shards = sorted(glob.glob(sys.argv[1]))
    scorer = TeacherScorer(sys.argv[2] if len(sys.argv) > 2 else "bench/teachers/cifar10_resnet20.safetensors", "cpu", "float32", topk=1,
                           feature_dim=1 << 16, seed=0, threads=2, inference="jit", streams=2)
    res = {}
    preds = {}
    for margin in [0, 1, 2, 4]:
        with mp.get_context("spawn").Pool(2) as p:
            parts = p.map(dec, [(s, 32, margin) for s in shards], chunksize=1)
        x, y = np.concatenate([a for a, _, _ in parts]), np.concatenate([b for _, b, _ in parts])
        cpu = sum(c for *_, c in parts)
        pred = np.concatenate([scorer._forward(x[i:i + 500])[0].argmax(1).numpy() for i in range(0, len(x), 500)])
        preds[margin] = pred
        res[margin] = {"n": len(y), "top1": float((pred == y).mean()), "cpu_ms": 1000 * cpu / len(y)}
        if margin:
            a, b = preds[0] == y, pred == y
            res[margin]["only_full_right"] = int((a & ~b).sum()); res[margin]["only_reduced_right"] = int((~a & b).sum())
        print(margin, res[margin], flush=True)
    print(json.dumps(res))
