"""Export a model as a self-contained serving artifact (jax.export programs, weights, tokenizer).

    python scripts/export.py --model smollm2-135m-instruct --out /tmp/smollm2-art --platforms cpu,tpu
    python -c "from serving import artifact; print(artifact.load('/tmp/smollm2-art').generate('Hi'))"

The artifact runs with jax, numpy, tokenizers and safetensors only (serving.artifact.load does not
import model/); see docs/COMPILE.md for its layout and manifest.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import cli  # noqa: E402


def main(args) -> int:
    from serving import Engine
    from serving.artifact import ArtifactError, ExportShapes, export
    try:
        shapes = ExportShapes(max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                              prefill_lengths=tuple(int(t) for t in
                                                    args.prefill_lengths.split(","))).validate()
        platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
        eng = Engine.from_pretrained(args.model, dtype=args.dtype, attention="xla",
                                     max_seq_len=args.max_seq_len, num_pages=2,
                                     progress=not args.json)
        manifest = export(eng, args.out, platforms=platforms, shapes=shapes,
                          progress=not args.json)
    except ArtifactError as e:
        raise cli.CLIError(str(e)) from None
    print(json.dumps({"out": args.out, "platforms": manifest["platforms"],
                      "programs": len(manifest["programs"]), "files": len(manifest["sha256"]),
                      "buckets": manifest["buckets"], "max_seq_len": manifest["max_seq_len"]}))
    return 0


if __name__ == "__main__":
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="known model name, path to a .gguf file, or a Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--platforms", default="cpu", help="comma-separated: cpu, cuda, tpu")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch of the programs")
    p.add_argument("--max-seq-len", type=int, default=1024, help="context per sequence")
    p.add_argument("--prefill-lengths", default="16,64,256", help="prefill length buckets")
    p.add_argument("--json", action="store_true", help="no progress bars")
    cli.run(main, p.parse_args())
