"""One try of a chat request on a pair of instances: the encode leg (the images' bytes)
and the language leg (the prompt's tokens) at once, the answer whole or streamed as
server-sent events in the OpenAI format. A leg that fails before any byte reached the
client is a LegError the router may try elsewhere; after the first byte an error event
and [DONE] end the stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from deepstack_runtime.servers.chat import ChatRequest, Choice, usage
from deepstack_runtime.servers.common import error
from deepstack_runtime.servers.instances import Instance, Pair
from deepstack_runtime.servers.prompt import Prompt, PromptBuilder
from deepstack_runtime.servers.upstream import LegError, Upstream
from deepstack_runtime.servers.wire import MEDIA_TYPE, encode_media

log = logging.getLogger(__name__)


@dataclass
class Exchange:
    upstream: Upstream
    builder: PromptBuilder
    model_name: str
    retries: Counter  # by the role of the instance that failed

    def choices(self, chat: ChatRequest) -> list[Choice]:
        eos = self.builder.eos_token_id
        return [Choice(i, chat.stop, eos, chat.sampling.ignore_eos) for i in range(chat.n)]

    async def attempt(
        self,
        request: web.Request,
        chat: ChatRequest,
        prompt: Prompt,
        pair: Pair,
        created: int,
        *,
        last: bool,
    ) -> web.StreamResponse | LegError:
        """One try on `pair`: the answer, or (unless it is the `last` try) the leg failure
        that another pair may well not have, before any byte reached the client."""
        language, encoder = pair.language, pair.encoder
        room = uuid.uuid4().hex  # a fresh room for each try: the last one may linger
        payload: dict[str, Any] = {
            "room": room,
            "encoder": encoder.bootstrap if encoder else "",
            "input_ids": prompt.input_ids,
            "image_grid_thw": prompt.image_grid_thw,
            "content": prompt.content,
            "sampling": chat.sampling.to_wire(),
            "n": chat.n,
        }
        legs: list[asyncio.Task[Any]] = []
        if encoder is not None:
            media = encode_media(room, [(item.media_item(), item.data) for item in prompt.media])
            legs.append(
                asyncio.create_task(
                    self.upstream.call("encode", encoder, "/v1/encode", media, MEDIA_TYPE)
                )
            )
        completion_id = f"chatcmpl-{room}"
        choices = self.choices(chat)
        try:
            if chat.stream:
                tokens = len(prompt.input_ids)
                return await self._stream(
                    request, chat, pair, payload, legs, completion_id, created, tokens
                )
            legs.insert(0, asyncio.create_task(self._whole(language, encoder, payload, choices)))
            # If either leg fails, the other is cancelled (the language side then frees its
            # blocks): one clear error, nothing waits for a timeout.
            done, pending = await asyncio.wait(legs, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                if any(t.exception() for t in done):
                    task.cancel()
            await asyncio.gather(*legs)
        except asyncio.CancelledError:
            # The client went away: both legs stop, and with them the pods' work.
            for task in legs:
                task.cancel()
            raise
        except LegError as e:
            for task in legs:
                task.cancel()
            errors = [e, *_leg_errors(legs)]
            # Nothing reached the client yet: another pair may serve it, without the
            # instances to blame (a language pod that could not reach its encode pod
            # blames that one).
            retryable = e.status >= 500 and any(err.retryable for err in errors)
            if not retryable or last:
                return upstream_error(e)
            log.info("retrying %s elsewhere: %s", completion_id, e.message)
            blamed_encoder = encoder is not None and e.blame == encoder.url
            self.retries.labels(role="encode" if blamed_encoder else "language").inc()
            e.avoid = frozenset(err.blame for err in errors)
            return e
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": [choice.message(self.builder.decode) for choice in choices],
                "usage": usage(len(prompt.input_ids), choices),
            }
        )

    async def _whole(
        self,
        language: Instance,
        encoder: Instance | None,
        payload: dict[str, Any],
        choices: list[Choice],
    ) -> None:
        """Every choice of a whole (non-streamed) answer. The language pod streams its
        steps even so: once every choice has finished (at a stop string included) the
        connection closes, which stops the pod's work."""
        r = await self.upstream.open_generation(language, payload, encoder)
        async with r:
            async for step in self.upstream.steps(language, r):
                choices[int(step["index"])].add(step, self.builder.decode)
                if all(c.finish_reason is not None for c in choices):
                    break
        for choice in choices:
            choice.end()

    async def _stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        pair: Pair,
        payload: dict[str, Any],
        legs: list[asyncio.Task[Any]],
        completion_id: str,
        created: int,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        """Relay the choices as the language server produces them. Once every choice has
        finished (a stop string included) the connection to the language pod closes,
        which stops its work."""
        language, decode = pair.language, self.builder.decode
        response: web.StreamResponse | None = None

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            assert response is not None
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                **extra,
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        async def send_news(choice: Choice) -> None:
            """What `choice` has new: text, log probabilities, its finish reason."""
            text = choice.sendable()
            done = choice.finish_reason is not None
            logprobs = choice.logprobs(decode, unsent_only=True)
            if text or done or (logprobs and logprobs["content"]):
                finish = choice.finish_reason if done else None
                delta = {"content": text} if text else {}
                news = {"index": choice.index, "delta": delta, "logprobs": logprobs}
                await send([{**news, "finish_reason": finish}])

        choices = self.choices(chat)
        # An encode leg that fails ends the stream at once, with its reason: the language
        # pod would otherwise wait out the room for rows that never come (an encode pod
        # that could not read the room, a draining one, tells it nothing).
        streaming = asyncio.current_task()
        assert streaming is not None
        encode_failures: list[LegError] = []

        def encode_done(task: asyncio.Task[Any]) -> None:
            failure = None if task.cancelled() else task.exception()
            if isinstance(failure, LegError) and not encode_failures:
                encode_failures.append(failure)
                streaming.cancel()

        for task in legs:
            task.add_done_callback(encode_done)
        try:
            r = await self.upstream.open_generation(language, payload, pair.encoder)
            async with r:
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
                for choice in choices:
                    role = {"role": "assistant", "content": ""}
                    await send([{"index": choice.index, "delta": role, "finish_reason": None}])
                async for step in self.upstream.steps(language, r):
                    choice = choices[int(step["index"])]
                    if choice.finish_reason is not None:
                        continue  # past its stop string
                    choice.add(step, decode)
                    await send_news(choice)
                    if all(c.finish_reason is not None for c in choices):
                        break  # leaving closes the connection: the pod stops generating
            for task in legs:  # the answer is whole: how the encode leg ends changes nothing
                task.remove_done_callback(encode_done)
            for choice in choices:
                if choice.finish_reason is None:
                    choice.end()
                    await send_news(choice)
            if chat.include_usage:
                await send([], usage=usage(prompt_tokens, choices))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            await asyncio.gather(*legs, return_exceptions=True)
            return response
        except (KeyError, ValueError, TypeError) as e:  # a step that is not ours
            failure = LegError(502, f"/v1/generate on {language.url}: bad step: {e!r}")
            if response is None or not response.prepared:
                raise failure from e
        except LegError as e:
            if response is None or not response.prepared:
                raise  # before the first byte: the caller may try another pair
            failure = e
        except asyncio.CancelledError:
            if not encode_failures or streaming.uncancel() > 0:
                raise  # the client went away
            failure = encode_failures[0]
            if response is None or not response.prepared:
                raise failure from None
        finally:
            for task in legs:
                task.remove_done_callback(encode_done)
        # After the first byte the status is sent: an error event ends the stream.
        for task in legs:
            task.cancel()
        event = {"message": failure.message, "type": "upstream_error", "code": failure.status}
        with contextlib.suppress(ConnectionError):
            await response.write(f"data: {json.dumps({'error': event})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response


def _leg_errors(legs: list[asyncio.Task[Any]]) -> list[LegError]:
    """The LegErrors of the legs that ended with one."""
    errors = []
    for task in legs:
        if task.done() and not task.cancelled():
            failure = task.exception()
            if isinstance(failure, LegError):
                errors.append(failure)
    return errors


def upstream_error(failure: LegError) -> web.Response:
    """An instance's error, as the client gets it: the caller's own mistakes (4xx) and
    "unavailable" or "timed out" as they are, any other failure as a bad gateway; "busy,
    retry after" passes through."""
    status = failure.status if failure.status < 500 or failure.status in (503, 504) else 502
    retry_after = failure.retry_after
    headers = {"Retry-After": retry_after} if status == 503 and retry_after else None
    return error(status, failure.message, "upstream_error", headers=headers)
