"""Fixtures shared by the tests/test_server_*.py files (imported from them):
a ds4 serve app on a free port in a background thread, driven by a
ScriptedEngine that speaks the tiny model's real tokenizer."""
from dataclasses import dataclass

import requests
import pytest

import ds4
from ds4.server import ScriptedEngine, Server, ServerThread

EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_q2):
    with ds4.load(tiny_q2, ctx=4096) as m:
        return m.tokenizer


@dataclass
class Harness:
    thread: ServerThread
    engine: ScriptedEngine
    server: Server

    @property
    def url(self):
        return self.thread.url

    def openai(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"),
                             max_retries=0, **kw)

    def anthropic(self, **kw):
        import anthropic
        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", "unused"),
                                   max_retries=0, **kw)

    def post(self, path, body=None, *, data=None, headers=None, timeout=30):
        return requests.post(self.url + path, json=body, data=data, headers=headers,
                             timeout=timeout)


def start_harness(tokenizer, *, engine_kw=None, **server_kw):
    engine = ScriptedEngine(tokenizer, ctx=server_kw.pop("ctx", 8192), **(engine_kw or {}))
    server = Server(engine, **server_kw)
    return Harness(ServerThread(server).start(), engine, server)


@pytest.fixture
def harness(tiny_tokenizer):
    h = start_harness(tiny_tokenizer)
    yield h
    h.thread.stop()
