"""Models from transformers and open_clip against a timm ViT of the same size: CDAM throughput side by side.

Each family is made from its library's config at one size (random weights), saved the way users save it
and loaded through ``load_model`` (``hf:FOLDER``, ``open_clip:CONFIG.json``), then explained with the
engine (vanilla, top-1 class or one concept for a model without classes). The reference is timm's
``VisionTransformer`` of the same width, depth, heads and input, explained the same way (closed form). The
transformers/open_clip forward pass alone is timed too. Cases are interleaved round by round; each number
is the median over the rounds after one warm-up.

    python -m bench.bench_models                      # CPU: width 384, depth 6, 6 heads, 112 px, batch 8
    python -m bench.bench_models --depth 12 --image 224 --rounds 5

Writes the ``## Models from transformers and open_clip`` section of ``BENCHMARKS.md`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from bench.report import command_line, load_average, machine_line, write_section
from cdam_worker import CDAMExplainer, Concept, load_model
from cdam_worker.maps.hf_models import hf_outputs

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Models from transformers and open_clip"


def hf_families(width: int, depth: int, heads: int, image: int, patch: int) -> dict[str, tuple]:
    import transformers as tf

    size = {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "image_size": image,
        "patch_size": patch,
    }
    squash = {"size": {"height": image, "width": image}}
    crop = {"size": {"shortest_edge": image}, "crop_size": {"height": image, "width": image}}
    return {
        "ViTForImageClassification": (
            tf.ViTConfig(**size, intermediate_size=4 * width, num_labels=10),
            tf.ViTImageProcessor(**squash),
        ),
        "DeiTForImageClassificationWithTeacher": (
            tf.DeiTConfig(**size, intermediate_size=4 * width, num_labels=10),
            tf.DeiTImageProcessor(**squash, do_center_crop=False),
        ),
        "Dinov2ForImageClassification": (tf.Dinov2Config(**size, num_labels=10), tf.BitImageProcessor(**crop)),
        "CLIPVisionModelWithProjection": (
            tf.CLIPVisionConfig(**size, intermediate_size=4 * width, projection_dim=256),
            tf.CLIPImageProcessor(**crop),
        ),
    }


def timed(run, rounds: int) -> list[float]:
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    import open_clip
    import transformers as tf

    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.image, args.image)
    cases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, processor) in hf_families(
            args.width, args.depth, args.heads, args.image, args.patch
        ).items():
            folder = Path(tmp) / name
            getattr(tf, name)(config).eval().save_pretrained(folder, safe_serialization=True)
            processor.save_pretrained(folder)
            hf_model = getattr(tf, name).from_pretrained(folder, use_safetensors=True).eval()
            cases[name] = {"loaded": load_model(f"hf:{folder}"), "library": lambda m=hf_model: hf_outputs(m, images)}
        clip_config = {
            "embed_dim": 256,
            "vision_cfg": {
                "image_size": args.image,
                "layers": args.depth,
                "width": args.width,
                "head_width": args.width // args.heads,
                "patch_size": args.patch,
            },
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
        }
        config_path = Path(tmp) / "bench-clip.json"
        config_path.write_text(json.dumps(clip_config))
        open_clip.add_model_config(config_path)
        clip_model = open_clip.create_model("bench-clip").eval()
        torch.save(clip_model.state_dict(), Path(tmp) / "clip.pt")
        cases["open_clip VisionTransformer"] = {
            "loaded": load_model(f"open_clip:{config_path}", checkpoint=Path(tmp) / "clip.pt"),
            "library": lambda: clip_model.encode_image(images),
        }

        reference = timm.create_model(
            "vit_small_patch16_224",
            img_size=args.image,
            patch_size=args.patch,
            embed_dim=args.width,
            depth=args.depth,
            num_heads=args.heads,
            num_classes=10,
        ).eval()
        timm_explainer = CDAMExplainer(reference)
        rows = []
        with torch.no_grad():
            for name, case in cases.items():
                loaded = case["loaded"]
                explainer = CDAMExplainer(loaded)
                targets, concepts = (
                    ("topk:1", [])
                    if loaded.num_classes
                    else ("none", [Concept("c", torch.randn(loaded.model.num_features))])
                )
                runs = {
                    "converted": lambda e=explainer, t=targets, c=concepts: e.explain(images, t, concepts=c),
                    "timm": lambda: timm_explainer.explain(images, "topk:1"),
                    "forward": case["library"],
                }
                times = {key: [] for key in runs}
                for _ in range(args.rounds):  # interleaved: a change of load hits every case alike
                    for key, run in runs.items():
                        times[key].extend(timed(run, 1))
                medians = {key: statistics.median(values) for key, values in times.items()}
                rows.append(
                    f"| {name} | {explainer.method.replace('_', ' ')} | {args.batch / medians['converted']:.1f} | {args.batch / medians['timm']:.1f} | "
                    f"{medians['converted'] / medians['timm']:.2f} | {args.batch / medians['forward']:.1f} |"
                )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join(
        [
            SECTION,
            "",
            f"Measured {stamp}: {machine_line(torch.device('cpu'), torch.get_num_threads())}; load average {load_average()}.",
            (
                f"`{command_line('bench.bench_models')}`: width {args.width}, depth {args.depth}, {args.heads} heads, {args.image} px, patch {args.patch}, "
                f"batch {args.batch}, median of {args.rounds} interleaved rounds. Images/s of vanilla CDAM (top-1 class, or one concept without classes) "
                "of the converted model and of timm's ViT of the same size (closed form), their time ratio, and the library's own forward pass alone."
            ),
            "",
            "| family | path | converted img/s | timm same size img/s | time ratio | library forward img/s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            (
                "A closed-form family is timm's ViT after conversion, so its ratio is 1 up to noise. Autograd families "
                "(distilled DeiT, the DINOv2 classifier) pay one backward pass through the last block per target chunk."
            ),
            *(
                [
                    (
                        f"\nNote: the load average ({load_average()}) exceeded the {os.cpu_count()} cores while this ran (other jobs shared the "
                        "machine), so these ratios are within the noise; rerun on a quiet machine for figures to quote."
                    )
                ]
                if os.getloadavg()[0] > (os.cpu_count() or 1)
                else []
            ),
        ]
    )
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, section)


if __name__ == "__main__":
    main()
