"""Throughput of the stream (issue 25): micro-batched student passes (``--batch``) and teacher calls in
flight (``--teacher-concurrency``). Ratios are measured within one run of this script, on one machine.

    # the default student (local:smollm2) on Fashion-MNIST at 5%: student seconds a query and accuracy
    python benchmarks/bench_throughput.py student --n 100 --batches 1,8 --orders 0,1,2

    # the default student's passes alone: the same 2-shot prompts one at a time and 8 at a time
    python benchmarks/bench_throughput.py passes --queries 32 --batches 1,8 --repeats 3

    # a full-size random-weight SmolVLM-256M-Instruct (hf:, built from its published config values,
    # no download) scoring the 10 Fashion-MNIST options with 2 demos: queries a second at each batch
    python benchmarks/bench_throughput.py vlm --queries 16 --batches 1,4,8,16 [--device cuda]
    # the same for a full-size llava-onevision-qwen2-0.5b, each query shown 2 of a pool of 8 demos,
    # without and with the vision cache
    python benchmarks/bench_throughput.py vlm --model llava-onevision-0.5b --pool 8 --image-cache 0|256

    # a loopback OpenAI-compatible teacher that sleeps --latency s a call, at 5%, C=1 vs C=4: how much
    # of the teacher's latency the stream hides ((wall slow - wall instant) vs 0.2 x calls x latency)
    python benchmarks/bench_throughput.py teacher --n 200 --latency 3 --concurrency 1,4 --student-seconds 0.1

Each prints a table and writes JSON to benchmarks/results/throughput_<part>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from bench_transport import Server  # uvicorn on a free loopback port in a thread

RESULTS = Path(__file__).resolve().parent / "results"


def _median_spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def _write(part: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"throughput_{part}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")


def _log(out: Path) -> list[dict[str, Any]]:
    from icdistill.runlog import read_records

    return [r for r in read_records(out / "log.jsonl") if r.get("event") == "query"]


def _per_class(log: list[dict[str, Any]]) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for r in log:
        by.setdefault(r["label"], []).append(bool(r["correct"]))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(by.items())}


# -- the default student ------------------------------------------------------------------------------


def bench_student(args: argparse.Namespace) -> None:
    from icdistill.runner import RunConfig, build_parts, run_icd

    batches = [int(b) for b in args.batches.split(",")]
    orders = [int(s) for s in args.orders.split(",")]
    parts = build_parts(RunConfig(student=args.student))
    model = parts.student.lm()[0] if hasattr(parts.student, "lm") else None
    dtype = str(getattr(model, "dtype", "-")).replace("torch.", "")
    print(f"student {args.student}, dtype {dtype}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in batches:
            for seed in orders if b == 1 else orders[: args.batched_orders]:
                # nothing learned online by an earlier run (calibration), no reading cached by it, nor
                # an image's tags: every run starts as a fresh process would, models aside
                student = parts.student.fresh() if hasattr(parts.student, "fresh") else parts.student
                forget = getattr(student, "forget_readings", None)
                if forget is not None:
                    forget()
                tags = getattr(student, "_tags", None)
                if tags is not None:
                    tags.clear()
                out = Path(tmp) / f"b{b}s{seed}"
                t0 = time.perf_counter()
                config = RunConfig(student=args.student, n=args.n, batch=b, seed=seed)
                run_icd(config, out, parts=replace(parts, student=student))
                wall = time.perf_counter() - t0
                log = _log(out)
                student = [r["seconds"]["student"] for r in log]
                row = {
                    "batch": b,
                    "seed": seed,
                    "n": len(log),
                    "wall_s": round(wall, 2),
                    "student_s_per_query_median": round(statistics.median(student), 4),
                    "student_s_per_query_mean": round(statistics.fmean(student), 4),
                    "accuracy": round(sum(r["correct"] for r in log) / len(log), 3),
                    "teacher_calls": sum(r["teacher_asked"] for r in log),
                    "per_class": _per_class(log),
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "per_class"}), flush=True)
    base = [r for r in rows if r["batch"] == 1]
    print("\nbatch  seed  student s/query (mean)  ratio vs B=1 (same seed)  accuracy  wall s")
    for r in rows:
        ref = next((x for x in base if x["seed"] == r["seed"]), None)
        if ref is None:
            continue
        ratio = ref["student_s_per_query_mean"] / r["student_s_per_query_mean"]
        print(
            f"{r['batch']:>5}  {r['seed']:>4}  {r['student_s_per_query_mean']:>22.3f}  {ratio:>24.2f}  "
            f"{r['accuracy']:>8.3f}  {r['wall_s']:>6.1f}"
        )
    _write("student", {"args": vars(args), "dtype": dtype, "rows": rows})


def _fmnist_prompts(n: int, shots: int, seed: int) -> tuple[list[Any], list[list[Any]]]:
    """``n`` Fashion-MNIST test queries, each with ``shots`` demos: labelled train-split images (as the
    pool would hold them)."""
    from icdistill.data.stream import load_dataset, stream_order
    from icdistill.types import Demo

    test, train = load_dataset("fashion-mnist", split="test"), load_dataset("fashion-mnist", split="train")
    queries = [test.item(i) for i in stream_order(len(test), n, seed, True)]
    pool = [train.item(i) for i in stream_order(len(train), n * shots, seed, True)]
    demos = [
        [Demo(id=j, query_id=d.id, image=d.image, prompt=d.prompt, answer=d.label or "") for j, d in
         enumerate(pool[i * shots : (i + 1) * shots])]
        for i in range(n)
    ]  # fmt: skip
    return queries, demos


def _time_passes(student: Any, queries: list[Any], demos: list[list[Any]], b: int, reset: Any) -> float:
    """Seconds for the student to read every query with its demos, ``b`` queries a pass."""
    reset()
    t0 = time.perf_counter()
    for i in range(0, len(queries), b):
        if b == 1:
            student.predict(queries[i], demos[i])
        else:
            student.predict_batch(queries[i : i + b], demos[i : i + b])
    return time.perf_counter() - t0


def bench_passes(args: argparse.Namespace) -> None:
    """The default student's passes alone (no loop): the same queries and 2-shot prompts read one at a
    time and in micro-batches, batch sizes alternating within each repeat (the machine's load then
    weighs on every batch size alike)."""
    from icdistill.models.registry import ModelContext, resolve_student

    student = resolve_student(args.student, ModelContext())
    print(f"student {args.student}, dtype {str(student.lm()[0].dtype).replace('torch.', '')}", flush=True)
    queries, demos = _fmnist_prompts(args.queries, 2, 0)

    def reset() -> None:  # every timing reads and tags its images itself
        student.forget_readings()
        student._tags.clear()

    _time_passes(student, queries[:2], demos[:2], 1, reset)  # model load, not measured
    batches = [int(b) for b in args.batches.split(",")]
    per_query: dict[int, list[float]] = {b: [] for b in batches}
    for rep in range(args.repeats):
        for b in batches if rep % 2 == 0 else batches[::-1]:
            per_query[b].append(_time_passes(student, queries, demos, b, reset) / len(queries))
            print(
                json.dumps({"batch": b, "repeat": rep, "s_per_query": round(per_query[b][-1], 4)}), flush=True
            )
    base = statistics.median(per_query[batches[0]])
    print(f"\nbatch  student s/query, median [min, max] of {args.repeats}  ratio vs B={batches[0]}")
    for b in batches:
        print(f"{b:>5}  {_median_spread(per_query[b]):>40}  {base / statistics.median(per_query[b]):>5.2f}")
    _write("passes", {"args": vars(args), "s_per_query": per_query})


# -- a full-size random-weight hf: VLM ------------------------------------------------------------------

# SmolVLM-256M-Instruct's published config.json (HuggingFaceTB/SmolVLM-256M-Instruct), the values that
# set its size: the SigLIP vision tower, the 9x9 pixel shuffle and the SmolLM2-135M-sized text model
SMOLVLM_256M = {
    "scale_factor": 4,
    "image_token_id": 49190,
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "text_config": {
        "vocab_size": 49280,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}


def build_full_size_smolvlm(path: Path) -> None:
    """A random-weight Idefics3 model with SmolVLM-256M-Instruct's sizes and a processor in its shape
    (images at 512 px, one tile: 64 image tokens each), saved as an hf: model folder."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from tiny_vlms import IDEFICS3_TEMPLATE, _save_processor, _tokenizer

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid])
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 512}, max_image_size={"longest_edge": 512})
    cfg = json.loads(json.dumps(SMOLVLM_256M))
    cfg["image_token_id"] = tok.convert_tokens_to_ids("<image>")
    text = cfg.pop("text_config")
    vision = cfg.pop("vision_config")
    text |= {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    config = Idefics3Config(text_config=text, vision_config=vision, **cfg)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    seq_len = (512 // 16) ** 2 // cfg["scale_factor"] ** 2
    _save_processor(path, tok, ip, IDEFICS3_TEMPLATE, {"image_seq_len": seq_len})


# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's published config.json, the values that set its size: the
# SigLIP-so400m tower at 384 px (729 tokens an image), Qwen2-0.5B, and the anyres grid up to 6x6 tiles
LLAVA_OV_05B = {
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 26,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "text_config": {
        "model_type": "qwen2",
        "vocab_size": 152000,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
    "vision_feature_select_strategy": "full",
    "vision_feature_layer": -1,
}


def build_full_size_llava_onevision(path: Path) -> None:
    """A random-weight LLaVA-OneVision model with llava-onevision-qwen2-0.5b-ov's sizes and a processor in
    its shape (an image among several: 729 tokens; alone: anyres tiles too), saved as an hf: folder."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_vlms import LLAVA_OV_TEMPLATE, _save_processor, _tokenizer

    tok = _tokenizer(["<image>", "<video>"])
    cfg = json.loads(json.dumps(LLAVA_OV_05B))
    ip = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384}, image_grid_pinpoints=cfg["image_grid_pinpoints"]
    )
    processor_config = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": 729,
        "vision_feature_select_strategy": "full",
    }
    _save_processor(path, tok, ip, LLAVA_OV_TEMPLATE, processor_config)
    cfg["text_config"] |= {"pad_token_id": tok.pad_token_id}
    config = LlavaOnevisionConfig(
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        **cfg,
    )
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(path)


VLMS = {"smolvlm-256m": build_full_size_smolvlm, "llava-onevision-0.5b": build_full_size_llava_onevision}


def _time_vision_tower(model: Any) -> dict[str, float]:
    """Wrap the model's vision tower's forward to add its wall time to the returned dict's ``s``."""
    tower = next(
        m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("vision_model", "vision_tower", "visual")
    )
    spent = {"s": 0.0}
    forward = tower.forward

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            spent["s"] += time.perf_counter() - t0

    tower.forward = timed
    return spent


def bench_vlm(args: argparse.Namespace) -> None:
    from PIL import Image

    from icdistill.data.fashion_mnist import LABELS
    from icdistill.models.registry import ModelContext, resolve_student
    from icdistill.types import Demo, Query

    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}-random"
        VLMS[args.model](path)
        spec = f"hf:{path}?dtype={args.dtype}&device={args.device}"
        if args.model == "smolvlm-256m":
            spec += "&split=0&max_side=512"
        spec += f"&image_cache={args.image_cache}"
        student = resolve_student(spec, ModelContext())
        rng = np.random.default_rng(0)

        def image() -> Image.Image:
            return Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB")

        q = "What item of clothing is shown?"
        queries = [Query(id=f"q{i}", image=image(), prompt=q, options=LABELS) for i in range(args.queries)]
        if args.pool:  # a stream's pool: each query is shown `shots` of its `pool` demos
            pool = [
                Demo(id=j, query_id=f"d{j}", image=image(), prompt=q, answer=LABELS[j % 10])
                for j in range(args.pool)
            ]
            demos = [
                [pool[int(j)] for j in rng.choice(args.pool, args.shots, replace=False)] for _ in queries
            ]
        else:  # every query its own demos: no image is shown twice
            demos = [[Demo(id=j, query_id=f"d{i}{j}", image=image(), prompt=q, answer=LABELS[j]) for j in range(args.shots)]
                     for i in range(args.queries)]  # fmt: skip
        student.predict(queries[0], demos[0])  # warm-up
        tower = _time_vision_tower(student.loaded.model)
        rows = []
        for b in batches:
            times, tower_s = [], []
            for _rep in range(args.repeats):
                tower["s"] = 0.0
                if student.image_cache is not None:  # every timing starts with no image computed
                    student.image_cache.clear()
                t0 = time.perf_counter()
                for i in range(0, len(queries), b):
                    if b == 1:
                        student.predict(queries[i], demos[i])
                    else:
                        student.predict_batch(queries[i : i + b], demos[i : i + b])
                times.append(time.perf_counter() - t0)
                tower_s.append(tower["s"])
            qps = [len(queries) / t for t in times]
            rows.append(
                {
                    "batch": b,
                    "queries_per_s": [round(x, 3) for x in qps],
                    "median_qps": statistics.median(qps),
                    # where the time went: the vision tower's share of each repeat's wall time
                    "vision_tower_share": [round(v / t, 3) for v, t in zip(tower_s, times, strict=True)],
                    "vision_tower_s_per_query": statistics.median(tower_s) / len(queries),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["median_qps"]
    print("\nbatch  queries/s (median)  ratio vs B=1  vision tower s/query  rest s/query")
    for r in rows:
        tower_q = r["vision_tower_s_per_query"]
        print(
            f"{r['batch']:>5}  {r['median_qps']:>19.3f}  {r['median_qps'] / base:>12.2f}"
            f"  {tower_q:>20.3f}  {1 / r['median_qps'] - tower_q:>12.3f}"
        )
    import torch

    device = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    tag = (
        f"vlm_{args.device}"
        + ("" if args.model == "smolvlm-256m" else f"_{args.model}")
        + (f"_pool{args.pool}_cache{args.image_cache}" if args.pool else "")
    )
    _write(tag, {"args": vars(args), "device": device, "rows": rows})


# -- a slow loopback teacher -----------------------------------------------------------------------------


def _pixel_key(image: Any) -> str:
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def teacher_app(labels: dict[str, str], latency: float) -> Any:
    """An OpenAI-compatible app that answers each image's label after ``latency`` seconds."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from PIL import Image

    app = FastAPI()
    app.state.calls = 0

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> JSONResponse:
        app.state.calls += 1
        part = next(p for p in reversed(body["messages"][-1]["content"]) if p.get("type") == "image_url")
        image = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
        await asyncio.sleep(latency)
        answer = labels.get(_pixel_key(image), "unknown")
        choices = [{"index": i, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                   for i in range(int(body.get("n", 1)))]  # fmt: skip
        return JSONResponse({"choices": choices, "usage": {"prompt_tokens": 10, "completion_tokens": 1}})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": [{"id": "teacher"}]}

    return app


class PixelEmbedder:
    """A cheap retrieval embedder (7x7 average-pooled pixels; text: a hashed bag of words), so the
    teacher timings are not drowned by the default embedder on a busy CPU."""

    def embed_query(self, query: Any) -> dict[str, np.ndarray]:
        from icdistill.types import IMAGE, TEXT

        img = np.asarray(query.image.convert("L").resize((7, 7)), dtype=np.float32).reshape(-1) + 1.0
        return {IMAGE: img / np.linalg.norm(img), TEXT: self.embed_texts([query.prompt])[0]}

    def embed_texts(self, texts: Any) -> np.ndarray:
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in str(t).lower().split():
                out[i, int(hashlib.sha1(w.encode()).hexdigest()[:8], 16) % 64] += 1.0
            out[i] /= max(1e-6, float(np.linalg.norm(out[i])))
        return out


class SleepingStudent:
    """Stands in for a GPU student that takes ``seconds`` a query: copies the nearest demo's answer."""

    name = "sleeping-student"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def predict(self, query: Any, demos: Any) -> Any:
        from icdistill.types import Prediction

        time.sleep(self.seconds)
        scores = {o: 0.0 for o in query.options}
        if demos and demos[-1].answer in scores:
            scores[demos[-1].answer] = 2.0
        return Prediction(
            answer=max(scores, key=scores.__getitem__), option_scores=scores, seconds=self.seconds
        )


def bench_teacher(args: argparse.Namespace) -> None:
    """Each setting (latency x C) ``--repeats`` times, the settings interleaved within each repeat (the
    machine's load then weighs on all alike); medians with their spread."""
    from icdistill.data.stream import load_dataset, stream_order
    from icdistill.models.registry import ModelContext, resolve_teacher
    from icdistill.runner import Parts, RunConfig, run_icd

    dataset = load_dataset("fashion-mnist", split="test")
    labels = {}
    for i in stream_order(len(dataset), args.n, 0, True):
        item = dataset.item(i)
        labels[_pixel_key(item.image)] = item.label
    concurrency = [int(x) for x in args.concurrency.split(",")]
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Server(teacher_app(labels, 0.0)) as instant,
        Server(teacher_app(labels, args.latency)) as slow,
    ):
        teachers = {}
        for latency, url in ((0.0, instant), (args.latency, slow)):
            spec = f"openai:teacher@{url}/v1?timeout=600&retries=0&cache=0&image_format=png&concurrency=16"
            teachers[latency] = (spec, resolve_teacher(spec, ModelContext()))
        settings = [(latency, c) for latency in teachers for c in concurrency]
        for rep in range(-1, args.repeats):  # repeat -1: a warm-up, not measured
            for latency, c in settings if rep >= 0 else settings[:1]:
                spec, teacher = teachers[latency]
                out = Path(tmp) / f"l{latency}c{c}r{rep}"
                parts = Parts(SleepingStudent(args.student_seconds), teacher, PixelEmbedder())
                cfg = RunConfig(n=args.n, teacher=spec, judge="off", teacher_concurrency=c)
                t0 = time.perf_counter()
                run_icd(cfg, out, parts=parts)
                wall = time.perf_counter() - t0
                log = _log(out)
                row = {
                    "latency_s": latency, "concurrency": c, "repeat": rep, "wall_s": round(wall, 2),
                    "calls": sum(r["teacher_asked"] for r in log),
                    "accuracy": round(sum(r["correct"] for r in log) / len(log), 3),
                }  # fmt: skip
                print(json.dumps(row), flush=True)
                if rep >= 0:
                    rows.append(row)

    def walls(latency: float, c: int) -> list[float]:
        return [r["wall_s"] for r in rows if r["latency_s"] == latency and r["concurrency"] == c]

    print(f"\nmedians [min, max] of {args.repeats}; added = median slow - median instant")
    print(
        "C  wall instant          wall slow             added  calls  0.2 x calls x latency  hidden  accuracy"
    )
    for c in concurrency:
        fast, slow_w = walls(0.0, c), walls(args.latency, c)
        calls = statistics.median(r["calls"] for r in rows if r["concurrency"] == c and r["latency_s"] > 0)
        added = statistics.median(slow_w) - statistics.median(fast)
        hidden = 1 - added / (calls * args.latency) if calls else 1.0
        acc = sorted({r["accuracy"] for r in rows if r["concurrency"] == c})
        print(
            f"{c}  {_median_spread(fast):<20}  {_median_spread(slow_w):<20}  {added:>5.1f}  {calls:>5}  "
            f"{0.2 * calls * args.latency:>21.1f}  {hidden:>6.0%}  {acc}"
        )
    _write("teacher", {"args": vars(args), "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    ps = sub.add_parser("passes")
    ps.add_argument("--queries", type=int, default=32)
    ps.add_argument("--batches", default="1,8")
    ps.add_argument("--repeats", type=int, default=3)
    ps.add_argument("--student", default="local:smollm2", help="e.g. local:smollm2?dtype=float32")
    s = sub.add_parser("student")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--batches", default="1,8")
    s.add_argument("--orders", default="0,1,2", help="stream orders (seeds) run at B=1; the first at every B")
    s.add_argument("--batched-orders", type=int, default=1, help="how many of the orders run at B > 1 too")
    s.add_argument("--student", default="local:smollm2", help="e.g. local:smollm2?dtype=float32")
    v = sub.add_parser("vlm")
    v.add_argument("--model", choices=sorted(VLMS), default="smolvlm-256m", help="the published sizes built")
    v.add_argument("--queries", type=int, default=16)
    v.add_argument("--batches", default="1,4,8,16")
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--device", default="cpu")
    v.add_argument("--dtype", default="float32")
    v.add_argument("--shots", type=int, default=2, help="demos (each with its image) per query")
    v.add_argument(
        "--pool", type=int, default=0, help="demos drawn from a pool of this many (0: each query its own)"
    )
    v.add_argument("--image-cache", type=int, default=256, help="the hf: image_cache option (0: off)")
    t = sub.add_parser("teacher")
    t.add_argument("--n", type=int, default=200)
    t.add_argument("--latency", type=float, default=3.0)
    t.add_argument("--concurrency", default="1,4")
    t.add_argument("--student-seconds", type=float, default=0.1)
    t.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    {"passes": bench_passes, "student": bench_student, "vlm": bench_vlm, "teacher": bench_teacher}[args.part](
        args
    )


if __name__ == "__main__":
    main()
