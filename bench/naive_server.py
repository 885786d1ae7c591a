"""The baseline: the usual course-style wrapper, one ``model.generate`` thread per request.

FastAPI + TextIteratorStreamer, the pattern most "serve a HF model over HTTP" tutorials use. Each
request runs its own generate() on a thread; concurrent requests fight over the same cores.
Only for the benchmark; speaks just enough of the OpenAI streaming format for the bench client.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import TextIteratorStreamer

from model_service.llm.loader import load_model


def main() -> None:
    port, dtype = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "float32"
    loaded = load_model("smollm2-135m-instruct", dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    app = FastAPI()

    @app.get("/health/ready")
    def ready():
        return {"status": "ready"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        max_tokens = body.get("max_tokens", 64)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                      do_sample=False, streamer=streamer, pad_token_id=tokenizer.pad_token_id)
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        threading.Thread(target=model.generate, kwargs=kwargs, daemon=True).start()

        def events():
            for text in streamer:  # blocks a threadpool thread per request, as these wrappers do
                chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": ids.shape[1], "completion_tokens": max_tokens}
            yield f"data: {json.dumps({'choices': [], 'usage': usage, 'created': time.time()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
