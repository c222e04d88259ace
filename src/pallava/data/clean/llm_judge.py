"""A yes/no judge over any OpenAI-compatible chat endpoint (vLLM, llama.cpp, the project's own server).

The paper judged images with GLM-4V-9B and captions with Qwen2-7B; users serve such models locally and
point this judge at them. Answers are cached by content hash (model + prompt + image bytes or text), so a
re-run or a resume never asks twice. Transient failures (timeouts, connection errors, 429, 5xx) are retried
with exponential back-off; what still fails becomes an error verdict, never a silent keep or drop.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from pallava.data.clean.verdict import Verdict
from pallava.processing.loading import DEFAULT_MAX_PIXELS, load_image

DEFAULT_IMAGE_PROMPT = (
    "Is this a pathology image, that is, a microscopy image of a tissue or cell sample (for example H&E, "
    "immunohistochemistry or cytology), or a gross pathology specimen? Answer only yes or no."
)
DEFAULT_TEXT_PROMPT = (
    "Here is a figure caption:\n\n{text}\n\nDoes it describe human pathology? Answer no if it describes "
    "animal tissue (for example mouse, rat, rabbit, pig or dog), a veterinary case or an animal experiment. "
    "Answer only yes or no."
)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_YES_WORDS, _NO_WORDS = frozenset({"yes", "y", "true"}), frozenset({"no", "n", "false"})


def parse_yes_no(answer: str) -> bool | None:
    """Read a yes/no answer robustly: markdown, punctuation, 'Answer: Yes', reasoning blocks, 是/否.

    The first word decides when it is yes/no; otherwise an 'answer is X' phrase; otherwise the answer
    must contain exactly one of yes/no. Anything else is None (unclear).
    """
    text = _THINK.sub(" ", answer).strip().lower()
    text = re.sub(r"^[\s*_`#>\"'(\[]+", "", text)
    if text.startswith(("不是", "否", "不")):
        return False
    if text.startswith(("是", "对")):
        return True
    words = re.findall(r"[a-z]+", text)
    if not words:
        return None
    if words[0] in _YES_WORDS or words[0] in _NO_WORDS:
        return words[0] in _YES_WORDS
    stated = re.search(r"\banswer(?: is)?\s*[:=]?\s*\W*(yes|no)\b", text)
    if stated:
        return stated.group(1) == "yes"
    found = {w for w in words if w in ("yes", "no")}
    return (found == {"yes"}) if len(found) == 1 else None


class AnswerCache:
    """A thread-safe sqlite map from content hash to the raw model answer; safe across kills."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, answer))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


class JudgeRequestError(RuntimeError):
    """The endpoint did not give a usable answer after all retries."""


class OpenAIJudge:
    """Ask a chat model a yes/no question per image (`kind='image'`) or per text (`kind='text'`)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        kind: str = "text",
        prompt: str | None = None,
        system_prompt: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 8,
        cache: str | Path | None = None,
        max_side: int = 1024,
        max_tokens: int = 16,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if kind not in ("image", "text"):
            raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
        self.kind, self.model = kind, model
        self.prompt = prompt or (DEFAULT_IMAGE_PROMPT if kind == "image" else DEFAULT_TEXT_PROMPT)
        if kind == "text" and "{text}" not in self.prompt:
            raise ValueError("a text judge prompt must contain the placeholder {text}")
        self.system_prompt = system_prompt
        self.retries, self.backoff, self.concurrency = (
            max(0, int(retries)),
            float(backoff),
            max(1, int(concurrency)),
        )
        self.max_side, self.max_tokens, self.max_pixels = max_side, max_tokens, max_pixels
        key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=timeout, headers=headers)
        self.cache = AnswerCache(cache) if cache else None
        self.requests = 0  # HTTP requests sent, retries included

    def _key(self, content_hash: str) -> str:
        material = json.dumps([self.model, self.system_prompt, self.prompt, self.kind, content_hash])
        return hashlib.sha256(material.encode()).hexdigest()

    def _image_part(self, path: Path) -> dict[str, object]:
        image = load_image(path, self.max_pixels)
        image.thumbnail((self.max_side, self.max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    def _ask(self, user_content: object) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": user_content})
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests += 1
            try:
                response = self._client.post("chat/completions", json=body)
            except httpx.TransportError as error:  # timeouts, refused connections, broken reads
                last = f"{type(error).__name__}: {error}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise JudgeRequestError(f"HTTP {response.status_code}: {response.text[:200]}")
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                last = f"malformed response: {response.text[:120]!r}"
                continue
            if isinstance(content, list):  # content parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
        raise JudgeRequestError(f"no answer after {self.retries + 1} attempts ({last})")

    def _judge_one(self, item: Path | str) -> Verdict:
        try:
            if self.kind == "image":
                content_hash = hashlib.sha256(Path(item).read_bytes()).hexdigest()
            else:
                content_hash = hashlib.sha256(str(item).encode()).hexdigest()
            key = self._key(content_hash)
            answer = self.cache.get(key) if self.cache is not None else None
            if answer is None:
                if self.kind == "image":
                    content: object = [{"type": "text", "text": self.prompt}, self._image_part(Path(item))]
                else:
                    content = self.prompt.replace("{text}", str(item))
                answer = self._ask(content)
                if self.cache is not None:
                    self.cache.put(key, answer)
        except (JudgeRequestError, OSError, ValueError) as error:
            return Verdict(False, "judge error", f"{self.model}: {error}", error=True)
        decision = parse_yes_no(answer)
        if decision is None:
            return Verdict(False, "unclear judge answer", answer.strip()[:100])
        if decision:
            return Verdict(True, detail=answer.strip()[:40])
        reason = "not pathology (judge)" if self.kind == "image" else "not human pathology (judge)"
        return Verdict(False, reason, answer.strip()[:100])

    def _judge_all(self, items: Sequence[Path | str]) -> list[Verdict]:
        if self.concurrency == 1 or len(items) <= 1:
            return [self._judge_one(item) for item in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._judge_one, items))

    def judge_images(self, paths: Sequence[Path]) -> list[Verdict]:
        return self._judge_all(list(paths))

    def judge_texts(self, texts: Sequence[str]) -> list[Verdict]:
        return self._judge_all(list(texts))

    def close(self) -> None:
        self._client.close()
