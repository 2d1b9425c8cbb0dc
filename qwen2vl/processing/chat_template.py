"""Chat-template rendering: Jinja in an immutable sandbox, configured like transformers renders hub templates.

Hub templates are untrusted code, so they run in `ImmutableSandboxedEnvironment` and only ever see plain JSON-like
data (decoded images, arrays or tensors inside content blocks are replaced by an inert string: templates test for
the presence of media keys, never their values). `trim_blocks`/`lstrip_blocks` are on, `tojson` does not escape
HTML, and `raise_exception`/`strftime_now` are available, as in transformers.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the text being continued; its trailing space tells whether the template kept trailing whitespace.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_OPAQUE = "<object>"


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes ('<' → \u003c), which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses dunder/private attribute names (no path to CPython internals)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attributes may not start with '_': {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (assistant-mask markers) render their body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=lambda *a, **k: dict(*a, **k))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"Invalid chat template (line {e.lineno}): {e.message}") from e


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """Names the template reads from its context (used to tell template kwargs from processor kwargs)."""
    env = compile_chat_template(template).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))


def plain_data(value: Any) -> Any:
    """Deep copy into str/int/float/bool/None/list/dict; any other object becomes an inert placeholder string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch 0-d scalar
        return plain_data(value.item())
    if callable(getattr(value, "model_dump", None)):  # pydantic message objects
        return plain_data(value.model_dump())
    return _OPAQUE


def _openai_block_to_hf(block: Any) -> Any:
    """OpenAI `image_url` / `video_url` blocks → `{"type": "image"|"video", "url": ...}` (other keys kept)."""
    if not isinstance(block, dict):
        return block
    for kind in ("image", "video"):
        key = f"{kind}_url"
        if block.get("type") == key and key in block:
            info = block[key]
            url = info.get("url") if isinstance(info, dict) else info
            extra = {k: v for k, v in info.items() if k != "url"} if isinstance(info, dict) else {}
            rest = {k: v for k, v in block.items() if k not in ("type", key)}
            return {"type": kind, "url": url, **extra, **rest}
    return block


def normalize_conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """Accept one conversation or a batch; return (batch of message lists, was_batched).

    Messages become fresh dicts without None-valued keys (APIs send `content=None`, which templates mishandle);
    pydantic message objects are dumped; OpenAI `image_url`/`video_url` blocks become HF image/video blocks.
    """
    if hasattr(conversation, "messages"):
        conversation = conversation.messages
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("conversation must be a non-empty list of messages or a list of conversations.")
    first = conversation[0]
    batched = isinstance(first, (list, tuple)) or hasattr(first, "messages")
    convs = list(conversation) if batched else [conversation]
    out = []
    for conv in convs:
        conv = getattr(conv, "messages", conv)
        if not isinstance(conv, (list, tuple)):
            raise ValueError(f"Each conversation must be a list of messages, got {type(conv).__name__}.")
        messages = []
        for message in conv:
            if callable(getattr(message, "model_dump", None)):
                message = message.model_dump()
            if not isinstance(message, dict):
                raise ValueError(f"Chat messages should be dicts, but got {message!r}.")
            message = {k: v for k, v in message.items() if v is not None}
            if isinstance(message.get("content"), (list, tuple)):
                message["content"] = [_openai_block_to_hf(b) for b in message["content"]]
            messages.append(message)
        out.append(messages)
    return out, batched


def _mark_final_message(chat: list[dict]) -> str:
    """Append the continue tag to the last text of the final message; return that text (before tagging)."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty!")
    content = chat[-1].get("content")
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, list):
        for block in reversed(content):
            if isinstance(block, dict) and "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
    raise ValueError("continue_final_message is set but we could not find any text to continue in the final message!")


def render_chat_template(template: str, conversations: list[list[dict]], add_generation_prompt: bool = False,
                         continue_final_message: bool = False, tools: list | None = None,
                         documents: list | None = None, **variables) -> list[str]:
    """Render each conversation; `variables` (special tokens, `add_vision_id`, ...) are visible to the template."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible. Use "
                         "continue_final_message when you want the model to continue the final message, and "
                         "add_generation_prompt when you want to add a header that will prompt it to start a new "
                         "assistant message instead.")
    compiled = compile_chat_template(template)
    context = plain_data(variables)
    rendered = []
    for chat in conversations:
        chat = plain_data(chat)
        final_text = _mark_final_message(chat) if continue_final_message else None
        try:
            text = compiled.render(messages=chat, tools=plain_data(tools), documents=plain_data(documents),
                                   add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"Chat template error: {e}") from e
        if continue_final_message:
            tag = _CONTINUE_TAG.strip()
            if final_text.strip() not in text or tag not in text:
                raise ValueError("continue_final_message is set but the final message does not appear in the chat "
                                 f"after applying the chat template! Final message: {final_text.strip()!r}")
            loc = text.rindex(tag)
            # If the template kept the tag's trailing space it also kept the message's own trailing whitespace.
            text = text[:loc] if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()
        rendered.append(text)
    return rendered


# ---------------------------------------------------------------------------------------------------------------
# Processor-level chat templating: render, then (tokenize=True) collect media from content blocks and process.

_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64", "image_url")
_VIDEO_SOURCE_KEYS = ("video", "url", "path", "video_url")
_IMAGE_ITEM_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_VIDEO_ITEM_KEYS = _IMAGE_ITEM_KEYS + ("fps", "num_frames", "nframes")


def _source(block: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = block.get(key)
        if isinstance(value, dict) and "url" in value:  # {"image_url": {"url": ...}}
            value = value["url"]
        if value is not None:
            return value
    return None


def collect_media(conversations: list[list[dict]]) -> tuple[list, list, list[dict], list[dict]]:
    """Images and videos named in content blocks, in order across the batch, with their per-item options.

    A block counts as an image/video under the same test the Qwen2-VL template uses to emit a placeholder, so
    placeholders and media stay aligned; a block without a source contributes a placeholder only.
    """
    images, videos, image_opts, video_opts = [], [], [], []
    for conv in conversations:
        for message in conv:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for block in content:
                if not isinstance(block, dict):
                    continue
                kind = block.get("type")
                if kind == "image" or "image" in block or "image_url" in block:
                    src = _source(block, _IMAGE_SOURCE_KEYS)
                    if src is not None:
                        images.append(src)
                        image_opts.append({k: block[k] for k in _IMAGE_ITEM_KEYS if k in block})
                elif kind == "video" or "video" in block:
                    src = _source(block, _VIDEO_SOURCE_KEYS)
                    if src is not None:
                        videos.append(src)
                        opts = {k: block[k] for k in _VIDEO_ITEM_KEYS if k in block}
                        if "nframes" in opts:  # qwen-vl-utils name
                            opts["num_frames"] = opts.pop("nframes")
                        if opts.get("fps") is not None and opts.get("num_frames") is not None:
                            raise ValueError("`fps` and `num_frames` are mutually exclusive arguments, please use only one!")
                        if "fps" in opts or "num_frames" in opts:
                            opts["do_sample_frames"] = True
                        video_opts.append(opts)
    return images, videos, image_opts, video_opts


def apply_chat_template(processor: Any, conversation: Any, chat_template: str | None = None,
                        tools: list | None = None, documents: list | None = None, add_generation_prompt: bool = False,
                        continue_final_message: bool = False, tokenize: bool = False, return_dict: bool = False,
                        return_tensors: str | None = None, add_vision_id: bool = False, fps: float | None = None,
                        num_frames: int | None = None, padding: bool | str | None = None,
                        processor_kwargs: dict | None = None, media_limits: Any = None, **kwargs):
    """`Qwen2VLProcessor.apply_chat_template` (REFERENCE §7.4), plus loading of OpenAI `image_url`/`video_url` blocks
    and qwen-vl-utils per-item options.

    kwargs the template reads (`jinja2.meta`) are template variables; the others go to the processor, like
    `processor_kwargs`. `padding=None` pads batched conversations (on the tokenizer's side, left by default) and
    leaves a single one unpadded. `tokenize=False` → prompt(s); else `input_ids`, or the full `BatchFeature`
    with `return_dict=True`.
    """
    if return_tensors == "auto":  # transformers' default: python lists
        return_tensors = None
    template = chat_template or processor.chat_template
    if isinstance(template, dict):
        if "default" not in template:
            raise ValueError(f"The processor has several chat templates but none is named 'default': {sorted(template)}")
        template = template["default"]
    if template is None:
        raise ValueError("Cannot use apply_chat_template because this processor does not have a chat template.")
    conversations, batched = normalize_conversations(conversation)
    used = template_variables(template)
    proc_kw = dict(processor_kwargs or {})
    template_kw = {}
    for key, value in kwargs.items():
        (template_kw if key in used else proc_kw)[key] = value
    if "video_fps" in proc_kw:
        proc_kw.setdefault("fps", proc_kw.pop("video_fps"))
    if fps is not None:
        proc_kw["fps"] = fps
    if num_frames is not None:
        proc_kw["num_frames"] = num_frames
    if proc_kw.get("fps") is not None and proc_kw.get("num_frames") is not None:
        raise ValueError("`fps` and `num_frames` are mutually exclusive arguments, please use only one!")
    variables = {**processor.tokenizer.special_tokens_map, "add_vision_id": add_vision_id, **template_kw}
    prompts = render_chat_template(template, conversations, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message, tools=tools, documents=documents,
                                   **variables)
    if not tokenize:
        return prompts if batched else prompts[0]
    images, videos, image_opts, video_opts = collect_media(conversations)
    if proc_kw.get("images") is not None:  # media may also come explicitly, for templates that place them
        images, image_opts = proc_kw.pop("images"), None
    if proc_kw.get("videos") is not None:
        videos, video_opts = proc_kw.pop("videos"), None
    proc_kw.pop("images", None), proc_kw.pop("videos", None)
    if (proc_kw.get("fps") is not None or proc_kw.get("num_frames") is not None) and videos:
        proc_kw.setdefault("do_sample_frames", True)
    if padding is None:
        padding = batched
    out = processor(text=prompts if batched else prompts[0], images=images or None, videos=videos or None,
                    per_image_kwargs=image_opts if image_opts and any(image_opts) else None,
                    per_video_kwargs=video_opts if video_opts and any(video_opts) else None,
                    return_tensors=return_tensors, padding=padding, media_limits=media_limits, **proc_kw)
    return out if return_dict else out["input_ids"]


def tokenizer_apply_chat_template(tokenizer: Any, conversation: Any, chat_template: str | None = None,
                                  tokenize: bool = True, add_generation_prompt: bool = False,
                                  continue_final_message: bool = False, return_tensors: str | None = None,
                                  return_dict: bool = False, **variables):
    """`Qwen2TokenizerFast.apply_chat_template`: render with the tokenizer's template, optionally tokenize."""
    template = chat_template or tokenizer.chat_template
    if template is None:
        raise ValueError("Cannot use apply_chat_template because this tokenizer does not have a chat template.")
    conversations, batched = normalize_conversations(conversation)
    prompts = render_chat_template(template, conversations, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message,
                                   **{**tokenizer.special_tokens_map, **variables})
    prompts = prompts if batched else prompts[0]
    if not tokenize:
        return prompts
    out = tokenizer(prompts, return_tensors=return_tensors)
    return out if return_dict else out["input_ids"]
