"""The per-layer analysis (tools/yolo/layers.py) on real per-layer exports (YOLO11n, H200, TensorRT 8.6.1, level 1,
static batch 32) and the fallback's profiling flags. Expected counts and sums are read off the raw files with regexes,
not with the tool."""
import gzip
import json
import re
import sys

import pytest
from conftest import REPO

from tools.bench import layers_args, time_layers
from tools.core.errors import UserError
from tools.trtexec_py import parse_flags, profile_records, profile_text
from tools.yolo.layers import assign_blocks, by_block, compare, layer_table, load, read_layer_times, read_layers, \
    short_format, totals, write_tables

DATA = REPO / "tests" / "data" / "profile"
ENGINES = ("fp16", "int8-qdq")


def raw(label: str, what: str) -> str:
    return gzip.open(DATA / f"{label}.b32.L1.{what}.json.gz", "rt").read()


@pytest.fixture(scope="module")
def rows():
    return {lab: load(DATA / f"{lab}.b32.L1.layers.json.gz", DATA / f"{lab}.b32.L1.profile.json.gz")
            for lab in ENGINES}


def test_reads_trt86_layer_json_despite_its_control_characters():
    text = raw("int8-qdq", "layers")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # what breaks Polygraphy: raw \x1e inside the Metadata strings
    layers = read_layers(DATA / "int8-qdq.b32.L1.layers.json.gz")
    assert len(layers) == text.count('"LayerType":') == 236
    conv0 = next(x for x in layers if "/model.0/conv/Conv" in x.name)
    assert "\x1e" in conv0.metadata and conv0.layer_type == "CaskConvolution"
    rows = layer_table([conv0], {})
    assert rows[0]["onnx_nodes"].split() == ["/model.0/conv/Conv", "/model.0/act/Sigmoid", "/model.0/act/Mul"]
    assert rows[0]["precision"] == "int8" and rows[0]["block"] == "model.0"
    assert short_format(conv0.outputs[0].format) == "int8 NC/32HW32"


def test_every_timed_layer_has_a_block(rows):
    for lab, rs in rows.items():
        assert all(r["block"] for r in rs)
        other = [r["name"] for r in rs if r["block"] == "other" and r["ms"] > 0]
        assert not other, f"{lab}: timed layers without a block: {other[:3]}"  # observed: none


def test_blocks_of_layers_without_onnx_nodes(rows):
    by_name = {r["name"]: r for r in rows["int8-qdq"]}
    assert by_name["images_QuantizeLinear"]["block"] == "model.0"  # from the conv that consumes it
    assert by_name["(Unnamed Layer* 1079) [Slice]"]["block"] == "model.23"  # from its head neighbours
    copy = next(r for n, r in by_name.items()
                if n.startswith("Reformatting CopyNode for Input Tensor 0 to model.2.cv2."))
    assert (copy["block"], copy["kind"]) == ("model.2", "reformat")
    requant = next(r for n, r in by_name.items() if n.endswith("/model.12/Concat_output_0_QuantizeLinear_clone_0"))
    assert (requant["block"], requant["kind"]) == ("model.12", "qdq")  # DQ of model.10 + Q of model.12's concat
    assert by_name["/model.23/dfl/Softmax"]["branch"] == "dfl"


def test_head_is_found_by_its_dfl_nodes_not_by_number():
    from tools.yolo.layers import Layer

    layers = [Layer("/model.7/conv/Conv", "CaskConvolution", metadata="[ONNX Layer: /model.7/conv/Conv]"),
              Layer("/model.7/dfl/Softmax", "CaskSoftMaxV2", metadata="[ONNX Layer: /model.7/dfl/Softmax]"),
              Layer("/model.7/cv3.1/cv3.1.2/Conv", "CaskConvolution")]
    assert assign_blocks(layers) == [("model.7", "decode"), ("model.7", "dfl"), ("model.7", "cv3")]


def test_sum_of_layer_medians(rows):
    for lab, expected in (("fp16", 3.9313), ("int8-qdq", 3.0936)):
        medians = [float(v) for v in re.findall(r'"medianMs":\s*([-\d.eE+]+)', raw(lab, "profile"))]
        assert totals(rows[lab])["ms"] == pytest.approx(sum(medians), abs=1e-9)
        assert sum(medians) == pytest.approx(expected, abs=1e-4)


def test_reformat_layers_counted(rows):
    for lab, n_reformat, n_qdq in (("fp16", 59, 0), ("int8-qdq", 48, 8)):
        layer_types = re.findall(r'"LayerType": "(\w+)"', raw(lab, "layers"))
        rs = rows[lab]
        assert sum(r["kind"] == "reformat" for r in rs) == n_reformat
        assert sum(r["kind"] == "qdq" for r in rs) == n_qdq
        # every LayerType Reformat is a reformat or a standalone Q/DQ; the rest of the Q/DQ are Scale requantizes
        assert sum(r["layer_type"] == "Reformat" and r["kind"] in ("reformat", "qdq") for r in rs) \
            == layer_types.count("Reformat")
        assert sum(r["kind"] == "qdq" and r["layer_type"] == "Scale" for r in rs) == layer_types.count("Scale")
        # copy nodes TensorRT elided (NoOp) are not counted: they take no time
        elided = [r for r in rs if r["name"].startswith("Reformatting CopyNode") and r["layer_type"] == "NoOp"]
        assert all(r["kind"] == "none" and r["ms"] == 0 for r in elided)


def test_int8_convolutions_only_in_the_int8_engine(rows):
    convs = [r for r in rows["int8-qdq"] if r["kind"] == "conv"]
    int8 = [r for r in convs if r["precision"] == "int8"]
    assert all(re.search(r"i8|imma|int8", r["tactic"], re.I) for r in int8)  # INT8 kernels, by their names
    fp16 = {r["onnx_nodes"].split()[0] for r in convs if r["precision"] == "fp16"}
    assert fp16 == {"/model.10/m/m.0/attn/qkv/conv/Conv", "/model.10/m/m.0/attn/pe/conv/Conv",
                    "/model.10/m/m.0/attn/proj/conv/Conv"}  # the attention the recipe keeps out of INT8
    assert len(int8) == raw("int8-qdq", "layers").count('"LayerType": "CaskConvolution"') - len(fp16) == 85
    assert not [r for r in rows["fp16"] if r["precision"] == "int8"]


def test_by_block_and_comparison(rows):
    blocks = {b["block"]: b for b in by_block(rows["int8-qdq"])}
    assert sum(b["ms"] for b in blocks.values()) == pytest.approx(totals(rows["int8-qdq"])["ms"])
    assert sum(b["reformat_n"] for b in blocks.values()) == 48
    cmp = {r["block"]: r for r in compare(rows["fp16"], rows["int8-qdq"], ENGINES)}
    assert {"model.2", "model.23/cv2", "model.23/cv3", "model.23/dfl", "model.23/decode", "all"} <= set(cmp)
    m2 = cmp["model.2"]
    assert m2["reformat_ms_int8-qdq"] > m2["reformat_ms_fp16"]  # INT8 4-wide <-> 32-wide changes at 160x160
    assert m2["ms_int8-qdq"] > m2["ms_fp16"]
    assert cmp["all"]["conv_speedup"] == pytest.approx(1.285, abs=1e-3)
    assert cmp["all"]["above_2x_ms"] == pytest.approx(3.0936 - 3.9313 / 2, abs=1e-3)
    # the ceiling: INT8 convolutions as measured, everything else at exactly half of FP16's time
    conv_fp16, conv_int8 = cmp["all"]["conv_ms_fp16"], cmp["all"]["conv_ms_int8-qdq"]
    assert cmp["all"]["conv_bound_speedup"] == pytest.approx(3.9313 / (conv_int8 + (3.9313 - conv_fp16) / 2),
                                                             abs=1e-3)
    assert cmp["all"]["speedup"] < cmp["all"]["conv_bound_speedup"] < 2
    assert cmp["model.10"]["fp16_ms_int8-qdq"] > 0.1  # an FP16 island: C2PSA attention


def test_report_writes_tables_summary_and_plot(tmp_path):
    pairs = [(lab, DATA / f"{lab}.b32.L1.layers.json.gz", DATA / f"{lab}.b32.L1.profile.json.gz") for lab in ENGINES]
    (tmp_path / "qdq-old.layers.csv").write_text("name,ms\n")  # an earlier comparison's engine
    paths = write_tables(pairs, tmp_path, {"fp16": 4.08, "int8-qdq": 3.26})
    assert sorted(p.name for p in tmp_path.glob("*.layers.csv")) == ["fp16.layers.csv", "int8-qdq.layers.csv"]
    md = paths["summary"].read_text()
    # the largest reformat / Q/DQ layers, found in the raw files: max medianMs among LayerType Reformat
    for lab in ENGINES:
        layers = json.loads(raw(lab, "layers"), strict=False)["Layers"]
        times = {r["name"]: r["medianMs"] for r in json.loads(raw(lab, "profile"))[1:]}
        top = max((x for x in layers if x["LayerType"] == "Reformat"), key=lambda x: times[x["Name"]])["Name"]
        assert (top if not top.startswith("Reformatting") else top.split(" to ")[1]) in md
    assert "images_QuantizeLinear" in md and "/model.23/dfl/Softmax_output_0_QuantizeLinear" in md
    assert "## FP16/FP32 islands in int8-qdq" in md and "| model.10 |" in md
    assert "4.080" in md  # end-to-end beside the layer sums
    assert "Ceiling set by the convolutions" in md
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    header = paths["by_block"].read_text().splitlines()[0].split(",")
    assert {"block", "ms_fp16", "ms_int8-qdq", "conv_speedup_int8-qdq", "reformat_n_int8-qdq"} <= set(header)
    assert paths["int8-qdq.csv"].read_text().count("\n") == 237


def test_bad_inputs_are_one_line_errors(tmp_path):
    names_only = tmp_path / "names.json"  # what trtexec writes without --profilingVerbosity=detailed
    names_only.write_text('{"Layers": ["Reformatting CopyNode for Input Tensor 0 to /model.0/conv/Conv"\n'
                          ',"/model.0/conv/Conv"\n],\n"Bindings": ["images"\n,"output0"\n]}')
    with pytest.raises(UserError, match="profilingVerbosity=detailed") as e:
        read_layers(names_only)
    assert str(names_only) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        read_layers(tmp_path / "missing.json")
    with pytest.raises(UserError, match="no 'Layers' list"):
        read_layers(DATA / "fp16.b32.L1.profile.json.gz")  # the two files swapped
    with pytest.raises(UserError, match="no per-layer records"):
        read_layer_times(DATA / "fp16.b32.L1.layers.json.gz")
    with pytest.raises(UserError, match="export both from one engine"):
        load(DATA / "fp16.b32.L1.layers.json.gz", DATA / "int8-qdq.b32.L1.profile.json.gz")


def test_strict_json_in_trt10_style(tmp_path):
    layer = {"Name": "/model.23/dfl/conv/Conv", "LayerType": "CaskConvolution",
             "Inputs": [{"Name": "a", "Dimensions": [1, 16, 4, 8400], "Format/Datatype": "Half"}],
             "Outputs": [{"Name": "b", "Dimensions": [1, 1, 4, 8400], "Format/Datatype": "Float"}],
             "TacticValue": "0x00000000000003ea", "Metadata": "[ONNX Layer: /model.23/dfl/conv/Conv]\x1f"}
    path = tmp_path / "l.json"
    path.write_text(json.dumps({"Layers": [layer], "Bindings": ["a", "b"]}))  # escaped: strict JSON
    (row,) = layer_table(read_layers(path), {"/model.23/dfl/conv/Conv": 0.1})
    assert (row["block"], row["branch"], row["kind"], row["precision"]) == ("model.23", "dfl", "conv", "fp16")
    assert row["tactic"] == "0x00000000000003ea"


def test_fallback_takes_the_profiling_flags_and_writes_trtexecs_profile_format(tmp_path):
    args = layers_args("e.engine", 32, 640, "l.json", "p.json")
    opts = parse_flags(args)
    assert opts["separateProfileRun"] and opts["dumpProfile"] and opts["noDataTransfers"]
    assert (opts["exportProfile"], opts["exportLayerInfo"], opts["shapes"]) == ("p.json", "l.json",
                                                                               "images:32x3x640x640")
    assert parse_flags(["--onnx=m.onnx", "--profilingVerbosity=detailed", "--dumpLayerInfo"])["profilingVerbosity"]
    with pytest.raises(UserError, match="skipInference"):
        parse_flags(["--onnx=m.onnx", "--skipInference", "--exportLayerInfo=l.json"])
    runs = [{"conv": 1.0, "copy": 0.5}, {"conv": 3.0, "copy": 0.5}, {"conv": 2.0, "copy": 0.5}]
    records = profile_records(runs)
    assert records[0] == {"count": 3}
    assert records[1] == {"name": "conv", "timeMs": 6.0, "averageMs": 2.0, "medianMs": 2.0, "percentage": 80.0}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    assert read_layer_times(path) == {"conv": 2.0, "copy": 0.5}
    assert profile_text(records).splitlines()[-1].split()[-1] == "Total"


FAKE_TRTEXEC = '''import gzip, shutil, sys
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
for flag, what in (("exportLayerInfo", "layers"), ("exportProfile", "profile")):
    with gzip.open(f"{sys.argv[1]}/int8-qdq.b32.L1.{what}.json.gz", "rb") as src, open(opts[flag], "wb") as dst:
        shutil.copyfileobj(src, dst)
print("[I] GPU Compute Time: min = 3.2 ms, max = 3.4 ms, mean = 3.26 ms, median = 3.26 ms, percentile(99%) = 3.4 ms")
'''


def test_time_layers_through_a_stand_in_trtexec(tmp_path):
    """The glue the pipeline calls, with a script in trtexec's place that writes the H200 exports."""
    script = tmp_path / "fake_trtexec.py"
    script.write_text(FAKE_TRTEXEC)
    (tmp_path / "logs").mkdir()
    rec = time_layers(tmp_path / "e.engine", [sys.executable, str(script), str(DATA)], tmp_path / "logs/e", 32, 640)
    assert rec["e2e_ms"] == 3.26 and rec["layers_ms"] == pytest.approx(3.0936, abs=1e-4)
    assert rec["reformat_n"] == 48 and rec["profiled_runs"] == 50 and rec["ms_by_precision"]["int8"] > 2
    assert rec["csv"].endswith("e.profile-b32.layers.csv") and (tmp_path / "logs/e.profile-b32.log").is_file()
    with pytest.raises(UserError, match=r"e\.profile-b8\.log: timing the layers of .* failed"):
        time_layers(tmp_path / "e.engine", [sys.executable, "-c", "raise SystemExit(1)"], tmp_path / "logs/e",
                    8, 640)


def test_make_profile_reads_the_records_of_the_run(tmp_path):
    """`make profile`: the newest record of each recipe that holds a per-layer profile, side by side per profile."""
    import gzip
    import shutil

    from tools.profile import from_records
    from tools.core.layout import Layout

    layout = Layout("yolo11n", REPO, tmp_path)
    for name, stem in (("fp16", "fp16.b32.L1"), ("int8-qdq", "int8-qdq.b32.L1")):
        files = {}
        for kind in ("layers", "profile"):
            dst = tmp_path / f"{stem}.{kind}.json"
            with gzip.open(REPO / "tests/data/profile" / f"{stem}.{kind}.json.gz", "rb") as f, open(dst, "wb") as g:
                shutil.copyfileobj(f, g)
            files[kind] = str(dst)
        rec = {"name": name, "key": name, "level": 3, "profile": {"name": "b32"}, "updated_utc": "2026-11-27",
               "bench": [{"batch": 32, "cuda_graph": False, "latency_ms_p50": 3.5}],
               "layers": {"batch": 32, "layers_json": files["layers"], "profile_json": files["profile"]}}
        layout.write_json(layout.points / f"{name}.b32.{name}.json", rec)
    written = from_records([REPO / "recipes/int8-qdq.yaml", REPO / "recipes/fp16.yaml"], tmp_path,
                           profiles=["b32"])
    out = tmp_path / "yolo11n" / "profile" / "b32-L3"
    assert set(written) == {"b32"} and (out / "profile.md").is_file() and (out / "by-block.csv").is_file()
    with pytest.raises(UserError, match="no per-layer profile"):
        from_records([REPO / "recipes/int8-qdq.yaml"], tmp_path, profiles=["b1"])
