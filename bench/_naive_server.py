"""The server a user writes first, for bench/serve.py to measure against: FastAPI calling the eager model per image.

    python bench/_naive_server.py --source NAME@latest --model-dir DIR --port 8001

The FastAPI tutorial's shape: an `async def` endpoint that reads the body, decodes it with PIL, applies the
model's eval transforms and calls the model on that one image (torch.inference_mode), then returns the top
label. No batching, no thread pool, no JPEG draft decoding.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image

from retrain.data.transforms import eval_transforms
from retrain.model.loading import load_trained


def main() -> None:
    """Load the model and serve POST /predict on 127.0.0.1 until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    net, meta = load_trained(args.source, model_dir=args.model_dir)
    transform = eval_transforms(meta.preprocessing)
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, object]:
        image = Image.open(io.BytesIO(await request.body())).convert("RGB")
        with torch.inference_mode():
            probs = net(transform(image).unsqueeze(0)).softmax(dim=1)[0]
        p, index = probs.max(dim=0)
        return {"label": meta.class_names[int(index)], "p": float(p)}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
