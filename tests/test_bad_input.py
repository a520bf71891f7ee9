"""Every command answers bad input in one line: a table of bad flags, files and folders for the three training
scripts and the `python -m minivit.*` tools, each run as a subprocess (grouped per command by
tests/bad_input_driver.py). Each case must exit non-zero with a single `error: ...` line that names the problem (the
words in the table), print no traceback, and leave no checkpoint behind that a later good run would trip over.
A weight file carrying a pickled payload is refused at every door that reads one, and its payload never runs."""
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_command, script_env
from minivit.hf import export_hf
from minivit.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "bad_input_driver.py")


class Payload:
    """Unpickling this creates the file `marker`: the stand-in for code run from a data file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad (and a few good) inputs the table points at."""
    d = tmp_path_factory.mktemp("bad_inputs")
    f = {"dir": d, "marker": d / "PAYLOAD_RAN"}
    f["notes"] = d / "notes.txt"
    f["notes"].write_text("these are my notes, not weights\n")
    f["notes_jpg"] = d / "notes.jpg"
    f["notes_jpg"].write_text("not a picture\n")
    f["image"] = d / "cat.png"
    Image.new("RGB", (40, 40), (200, 100, 50)).save(f["image"])
    f["evil"] = d / "evil.pth"  # real ViT-Ti weights plus a payload: only a full unpickler would run it
    torch.save({"state_dict": build_model("vit_ti16").state_dict(), "extra": Payload(f["marker"])}, f["evil"])
    f["vit_ti"] = d / "vit_ti16.pth"  # good weights, of another model than the one asked for
    torch.save(build_model("vit_ti16").state_dict(), f["vit_ti"])
    f["empty"] = d / "empty.pth"
    f["empty"].write_bytes(b"")
    f["evil_run"] = d / "evil_run"  # an output folder whose checkpoint is the payload: --resume must refuse it
    f["evil_run"].mkdir()
    torch.save({"kind": "dino", "extra": Payload(f["marker"])}, f["evil_run"] / "checkpoint.pth")
    f["dino_run"] = d / "dino_run"  # a plain checkpoint of another kind, for train_vit.py --resume
    f["dino_run"].mkdir()
    torch.save({"kind": "dino", "epoch": 1, "args": {"arch": "vit_ti16"}}, f["dino_run"] / "checkpoint.pt")
    f["photos"] = d / "photos"  # an image folder with an empty class
    for name in ("cat", "dog"):
        (f["photos"] / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(f["photos"] / "cat" / "a.png")
    f["no_runs"] = d / "no_runs"
    f["no_runs"].mkdir()
    hostile_files(f, d)
    return f


def png_header(width, height):
    """A PNG of width x height that is only its header: Pillow sizes it without decoding (a 'bomb' in 57 bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def hostile_files(f, d):
    """Round two (issue 23): folders of unreadable images, a decompression bomb, a malformed model folder, output
    paths in the way, folders that are not the runs a tool reads."""
    def split_folder(root, write):
        """root/train/cat/ and root/val/cat/, each filled by write(folder)."""
        for split in ("train", "val"):
            (root / split / "cat").mkdir(parents=True)
            write(root / split / "cat")
        return root

    def unreadable(folder):
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "junk.jpg").write_text("not a picture\n")
        (folder / "gone.png").symlink_to(d / "nowhere.png")  # a dangling symlink

    # spaces and non-ASCII in the name, as a user's folder may have
    f["unreadable"] = split_folder(d / "all bad ü x", unreadable)
    f["bad_val"] = split_folder(d / "bad_val", lambda folder: None)  # train/ decodes, val/ does not
    Image.new("RGB", (8, 8)).save(f["bad_val"] / "train" / "cat" / "a.png")
    (f["bad_val"] / "val" / "cat" / "x.jpg").write_bytes(b"")
    (f["bad_val"] / "val" / "cat" / "y.jpg").write_text("junk")
    f["dangling"] = split_folder(d / "dangling", lambda folder: (folder / "a.png").symlink_to(d / "nowhere.png"))
    # 1.1x Pillow's limit: Pillow only warns, and would decode 100 Mpx
    f["bombs"] = split_folder(d / "bombs", lambda folder: (folder / "huge.png").write_bytes(png_header(10_000,
                                                                                                      10_000)))
    f["hf_bad_config"] = d / "hf_bad_config"
    export_hf(build_model("vit_ti16", num_classes=0), f["hf_bad_config"])
    (f["hf_bad_config"] / "config.json").write_text('{"hidden_size": 192,')
    f["hf_bad_tensors"] = d / "hf_bad_tensors"
    f["hf_bad_tensors"].mkdir()
    (f["hf_bad_tensors"] / "model.safetensors").write_bytes(b"junk")
    f["results_dir"] = d / "results_dir"  # where train_vit.py would write results.json at the very end
    (f["results_dir"] / "results.json").mkdir(parents=True)
    f["attention_file"] = d / "attention_file"
    f["attention_file"].mkdir()
    (f["attention_file"] / "attention").write_text("")
    f["compare_dir"] = d / "compare_dir"
    (f["compare_dir"] / "report.md").mkdir(parents=True)
    f["sup_run"] = d / "sup_run"  # a train_vit.py folder, no k-NN
    f["sup_run"].mkdir()
    (f["sup_run"] / "log.jsonl").write_text('{"epoch": 1, "train_loss": 2.3}\n')
    f["torn_log"] = d / "torn_log"
    f["torn_log"].mkdir()
    (f["torn_log"] / "log.jsonl").write_text('{"epoch": 0, "knn_top1": 10.0}\n{"epoch": 1, "tra')
    f["no_maps"] = d / "no_maps"  # a DINO log, but no attention records (a ResNet run)
    f["no_maps"].mkdir()
    (f["no_maps"] / "log.jsonl").write_text('{"epoch": 0, "knn_top1": 10.0}\n')
    f["under_file"] = f["notes"] / "sub"  # a path under a regular file
    f["bomb"] = d / "huge.png"  # 4.5x Pillow's limit: Pillow raises (not an OSError)
    f["bomb"].write_bytes(png_header(20_000, 20_000))
    f["float_tif"] = d / "float.tif"  # 32-bit float pixels: convert("RGB") would clip them
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(f["float_tif"])
    f["export_dir"] = d / "export_dir"
    (f["export_dir"] / "config.json").mkdir(parents=True)
    f["class_file"] = d / "class_file"  # photo_folder writes c0/ c1/ ...: a file c1 is in the way
    f["class_file"].mkdir()
    (f["class_file"] / "c1").write_text("")
    f["seg_dir"] = d / "seg_dir"
    (f["seg_dir"] / "report.md").mkdir(parents=True)


def cases(f):
    """command -> [(argv, words the one-line error must contain)]."""
    evil, notes, img = str(f["evil"]), str(f["notes"]), str(f["image"])
    bad, under = str(f["unreadable"]), str(f["under_file"])
    return {
        "minivit.tools.knn": [
            (["--weights", notes], "not a readable PyTorch file"),
            (["--weights", evil, "--arch", "vit_ti16"], "refused"),
            (["--weights", str(f["vit_ti"]), "--arch", "vit_s16"], "checkpoint of another model?"),
            (["--weights", str(f["empty"])], "is empty"),
            (["--weights", str(f["dir"] / "missing.pth")], "no checkpoint file at"),
            (["--k", "0"], "--k 0: must be > 0"),
            (["--temperature", "-1"], "--temperature -1.0: must be > 0"),
            (["--batch_size", "many"], "invalid int value"),
            (["--arch", "vit_zz"], "unknown arch"),
            (["--data", str(f["dir"] / "nowhere")], "not a folder"),
            (["--data", str(f["photos"])], "has no"),
            (["--device", "tpu"], "not supported"),
            (["--data", bad], f"{bad}/train: none of its 3 image files could be decoded"),  # round two from here
            (["--data", str(f["bad_val"]), "--k", "1"], f"{f['bad_val'] / 'val'}: none of its 2 image files"),
            (["--data", str(f["dangling"]), "--k", "1"], "a symlink to nothing"),
            (["--data", str(f["bombs"]), "--k", "1"], "Pillow's limit of 89,478,485"),
            (["--weights", str(f["hf_bad_config"]), "--arch", "vit_ti16"],
             f"{f['hf_bad_config'] / 'config.json'} is not valid JSON"),
            (["--weights", str(f["hf_bad_tensors"]), "--arch", "vit_ti16"], "not a readable safetensors file"),
            (["--raw_pixels", "--data", "digits", "--image_size", "100000", "--k", "1", "--num_workers", "0"],
             "out of memory"),  # 15 TB of pixels: the allocation fails at once
        ],
        "minivit.tools.attention_maps": [
            (["--image", str(f["notes_jpg"])], "not an image Pillow can read"),
            (["--image", str(f["dir"] / "missing.jpg")], "no such file"),
            (["--image", img, "--mass", "1.5"], "--mass 1.5: must lie in (0, 1]"),
            (["--image", img, "--image_size", "0"], "--image_size 0: must be > 0"),
            (["--image", img, "--weights", evil, "--arch", "vit_ti16"], "refused"),
            (["--image", img, "--arch", "resnet18"], "no self-attention"),
            (["--image", str(f["bomb"])], "Pillow's limit of 89,478,485"),
            (["--image", str(f["float_tif"])], "32-bit float pixels"),
            (["--image", img, "--image_size", "64", "--html", str(f["dir"])], "is a folder; give the path of a file"),
            (["--image", img, "--image_size", "64", "--html", f"{under}/page.html"], "is a file, not a folder"),
            (["--image", img, "--output_dir", under], "Not a directory"),
        ],
        "minivit.tools.linear": [
            (["--weights", evil, "--arch", "vit_ti16"], "refused"),
            (["--lr", "0"], "--lr 0.0: must be > 0"),
            (["--epochs", "-3"], "--epochs -3: must be > 0"),
            (["--lr", "nan"], "must be a finite number"),
            (["--data", bad, "--arch", "vit_ti16"], f"{bad}/train: none of its 3 image files"),
            (["--seed", "-1", "--data", str(f["dir"] / "nowhere")], "--seed -1: must lie in [0, 2**31)"),
        ],
        "minivit.tools.segmentation": [
            (["--weights", f"x={evil}", "--arch", "vit_ti16"], "refused"),
            (["--weights", f"x={notes}"], "not a readable PyTorch file"),
            (["--mass", "0"], "--mass 0.0: must lie in (0, 1]"),
            (["--data", str(f["dir"] / "voc")], "no such folder"),
            (["--weights", f"x={f['dir'] / 'missing.pth'}"], "no such file"),
            (["--output_dir", str(f["seg_dir"])], "holds a folder report.md"),
        ],
        "minivit.tools.copydetect": [
            (["--weights", f"x={notes}"], "not a readable PyTorch file"),
            (["--weights", f"x={evil}", "--arch", "vit_ti16"], "refused"),
            (["--num_originals", "0"], "--num_originals 0: must be > 0"),
            (["--image_size", "36"], "is not a multiple of patch_size"),
            (["--seed", "-1", "--data", str(f["dir"] / "nowhere")], "--seed -1: must lie in [0, 2**31)"),
        ],
        "bench/bench.py": [
            (["--iters", "0"], "--iters 0: must be > 0"),
            (["--only", "vit,warp"], "--only 'vit,warp': choose from"),
            (["--only", "data", "--data", str(f["dir"] / "nowhere")], "no such folder"),
            (["--device", "tpu"], "invalid choice"),
            (["--only", "data", "--out", f"{under}/bench.md"], "is a file, not a folder"),
        ],
        "minivit.tools.export_hf": [
            (["--weights", evil, "--arch", "vit_ti16"], "refused"),
            (["--weights", "none", "--arch", "resnet18"], "only ViTs"),
            (["--weights", "none", "--arch", "vit_ti16", "--output_dir", under], "Not a directory"),
            (["--weights", "none", "--arch", "vit_ti16", "--output_dir", str(f["export_dir"])],
             "holds a folder config.json"),
        ],
        "minivit.tools.photo_folder": [
            ([str(f["dir"] / "made"), "--images", "0"], "--images 0: must be > 0"),
            ([str(f["notes"]), "--images", "1"], "is a file, not a folder"),
            ([str(f["class_file"]), "--images", "2"], "holds a file c1 where the run writes a folder"),
        ],
        "minivit.tools.dino_figure": [
            ([str(f["no_runs"])], "has no log.jsonl: not a train_dino.py run?"),
            ([str(f["dir"] / "nowhere")], "is not a folder; give the --output_dir of a train_dino.py run"),
            ([str(f["photos"])], "has no log.jsonl"),
            ([str(f["sup_run"])], "has no k-NN record"),
            ([str(f["torn_log"])], "line 2 is not a JSON object"),
            ([str(f["no_maps"]), "--out", str(f["dir"] / "fig.png")], "has 0 ep*.pt files"),
            ([str(f["no_maps"]), "--out", str(f["dir"])], "is a folder; give the path of a file"),
            ([str(f["no_maps"]), "--out", f"{under}/fig.png"], "is a file, not a folder"),
            (["--bogus"], "see --help"),
        ],
        "minivit.tools.compare": [
            (["--fractions", "1.5"], "--fractions 1.5"),
            (["--epochs", "0"], "--epochs 0: must be > 0"),
            (["--load"], "is missing"),
            (["--common_args", '"unclosed'], "quote"),
            (["--load", "--output_dir", str(f["compare_dir"])], "report.md is a folder"),
        ],
        "train_vit.py": [
            (["--lr", "-1"], "--lr -1.0: must be > 0"),
            (["--crop_scale", "0"], "--crop_scale 0.0: must lie in (0, 1]"),
            (["--warmup_epochs", "30", "--epochs", "2"], "--warmup_epochs 30 must be smaller than --epochs 2"),
            (["--batch_size", "0"], "--batch_size 0: must be > 0"),
            (["--pretrained", evil], "refused"),
            (["--pretrained", notes], "not a readable PyTorch file"),
            (["--data", str(f["dir"] / "nowhere")], "not a folder"),
            (["--resume"], "no checkpoint at"),
            (["--resume", "--output_dir", str(f["dino_run"])], "is a 'dino' checkpoint"),
            (["--data", bad, "--batch_size", "2"], f"{bad}/train: none of its 3 image files could be decoded"),
            (["--epochs", "100000000000"], "more than a run can take"),
            (["--output_dir", str(f["results_dir"])], "holds a folder results.json"),
            (["--seed", "-1"], "--seed -1: must lie in [0, 2**31)"),
        ],
        "train_resnet.py": [
            (["--momentum", "2"], "--momentum 2.0: is a probability"),
            (["--train_fraction", "0"], "--train_fraction 0.0: must lie in (0, 1]"),
            (["--pretrained", evil], "refused"),
        ],
        "train_dino.py": [
            (["--arch", "vit_s8", "--global_crop_size", "30"], "--global_crop_size 30 is not a multiple"),
            (["--lr", "-1"], "--lr -1.0: must be > 0"),
            (["--teacher_temp", "0"], "--teacher_temp 0.0: must be > 0"),
            (["--global_crops_scale", "1.0", "0.4"], "LOW <= HIGH"),
            (["--local_crops_number", "-1"], "--local_crops_number -1: must be >= 0"),
            (["--momentum_teacher", "1.5"], "--momentum_teacher 1.5: is a probability"),
            (["--out_dim", "0"], "--out_dim 0: must be > 0"),
            (["--data", str(f["photos"])], "has no"),
            (["--arch", "vit_s8", "--device", "tpu"], "not supported"),
            (["--arch", "vit_s8", "--resume", "--output_dir", str(f["evil_run"])], "refused"),
            (["--arch", "vit_s8", "--data", f"{bad}/train", "--batch_size_per_gpu", "2"],
             f"{bad}/train: none of its 3 image files could be decoded"),
            (["--arch", "vit_s8", "--output_dir", str(f["attention_file"])], "holds a file attention"),
            (["--arch", "vit_s8", "--seed", str(2 ** 40)], "must lie in [0, 2**31)"),
        ],
    }


def run_cases(command, table, tmp_path):
    """All of one command's cases in one subprocess -> [(argv, words, exit status, stderr, output_dir)]."""
    argvs, outs = [], []
    for i, (argv, _) in enumerate(table):
        out = tmp_path / f"{command.replace('.', '_')}_{i}"
        outs.append(out)
        takes_output_dir = command not in NO_OUTPUT_DIR and "--output_dir" not in argv
        argvs.append([*argv, "--output_dir", str(out)] if takes_output_dir else argv)
    proc = run_command([sys.executable, DRIVER, command, json.dumps(argvs)], timeout=900, cwd=ROOT, env=script_env())
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(table), f"{command}: {len(results)} results for {len(table)} cases"
    return [(argv, words, r["code"], r["stderr"], out) for (argv, words), r, out in zip(table, results, outs)]


COMMANDS = ["minivit.tools.knn", "minivit.tools.attention_maps", "minivit.tools.linear", "minivit.tools.segmentation", "minivit.tools.copydetect",
            "bench/bench.py", "minivit.tools.export_hf", "minivit.tools.photo_folder", "minivit.tools.compare", "train_vit.py",
            "train_resnet.py", "train_dino.py", "minivit.tools.dino_figure"]
NO_OUTPUT_DIR = ("minivit.tools.knn", "minivit.tools.linear", "bench/bench.py", "minivit.tools.photo_folder",
                 "minivit.tools.dino_figure")


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_input_gives_one_line_and_writes_nothing(command, files, tmp_path):
    for argv, words, code, stderr, out in run_cases(command, cases(files)[command], tmp_path):
        where = f"{command} {' '.join(argv)}"
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code != 0, f"{where}: exit status 0"
        assert "Traceback" not in stderr, f"{where}: traceback\n{stderr[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: not one error line:\n{stderr[-2000:]}"
        assert words in lines[0], f"{where}: {lines[0]!r} does not say {words!r}"
        if out.exists() and out not in (files["evil_run"], files["dino_run"]):  # a folder may exist (its lock), a checkpoint may not
            assert not [p.name for p in out.iterdir() if p.name.startswith("checkpoint")], where
    assert not files["marker"].exists(), "a payload ran"
