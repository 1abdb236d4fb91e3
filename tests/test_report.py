"""jaxmoe-report: a short training run (staged, top-p routing) -> metrics.jsonl -> a valid PNG with
the expert-load heatmap and the imbalance curve, and the text summary."""

import os
import struct
import zlib

import numpy as np

from jaxmoe import report
from jaxmoe.train import trainer
from jaxmoe.train.flags import parse_args
from jaxmoe.train.metrics import read_metrics


def png_pixels(path) -> tuple[int, int, np.ndarray]:
    """Check the PNG chunk structure (signature, CRCs, IHDR first, IEND last), then decode it
    with Pillow (a matplotlib dependency)."""
    from PIL import Image

    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    img = Image.open(path)
    img.load()
    return img.width, img.height, np.asarray(img.convert("RGB"))


def test_report_renders_a_png_from_a_short_run(tmp_path, capsys):
    wd = str(tmp_path / "run")
    cfg = parse_args(["--config", "tiny-debug", "--steps", "5", "--workdir", wd,
                      "--model.overrides", "num_hidden_layers=2,router_top_p=0.6,router_min_k=1,"
                      "router_max_k=4", "--stage.enabled", "true", "--stage.warmup", "0.2",
                      "--loss.mtp_weight", "0", "--data.eval_batches", "0", "--ckpt.every", "0",
                      "--compile_cache", "", "--log.tensorboard", "false"])
    trainer.run(cfg)
    recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert [r["phase"] for r in recs] == [0, 1, 1, 1, 2]
    assert all(1.0 <= x <= 4.0 for r in recs for x in r["experts_per_token"])
    assert np.asarray(recs[0]["expert_counts"]).shape == (1, 8)  # 1 MoE layer x 8 experts
    out = str(tmp_path / "load.png")
    assert report.main([wd, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "MoE layer 0: busiest expert" in text and "experts per token" in text
    w, h, px = png_pixels(out)
    assert (w, h) == (1000, 850)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # a drawn figure, not a blank page
    share = report.token_share(recs)[0]
    np.testing.assert_allclose(share.sum(-1), 1.0)
    c = np.sum([r["expert_counts"] for r in recs], axis=0)
    np.testing.assert_allclose(share, c / c.sum(-1, keepdims=True))
    assert report.main([str(tmp_path / "nothing")]) == 2
