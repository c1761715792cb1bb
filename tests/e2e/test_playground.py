"""The playground in a real browser: headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image

from ovis_server.config import Settings

from .bodies import Z_IMAGE_ID
from .helpers import InProcessServer, ServerFactory

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "playground.png"
# As the machine's notes advise: no background traffic that a closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "no Chromium to test the playground in: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_generate_watch_progress_cancel_and_screenshot(
    server: InProcessServer, browser: Any
) -> None:
    token = server.token("browser")
    page = browser.new_page(viewport={"width": 390, "height": 900})  # a phone-sized screen
    page.goto(server.base_url + "/")
    page.fill("#token", token)
    page.dispatch_event("#token", "change")
    page.wait_for_selector("#field-prompt")
    # The form comes from the schema: every field, with its bounds and default.
    steps = page.locator("#field-num_inference_steps")
    assert steps.get_attribute("min") == "1"
    assert steps.get_attribute("max") == "50"
    assert steps.input_value() == "28"
    assert page.locator("#field-output_format").input_value() == "png"
    for field in ("negative_prompt", "guidance_scale", "seed", "image_size"):
        assert page.locator(f"#field-{field}").count() == 1

    page.fill("#field-prompt", 'A neon sign that reads "OVIS"')
    page.select_option("#field-image_size", "portrait_4_3")
    page.fill("#field-num_inference_steps", "40")
    page.fill("#field-seed", "7")
    paths: list[str] = []
    page.on("request", lambda request: paths.append(urlsplit(request.url).path))
    page.click("#submit")

    progress_values: set[str] = set()
    deadline = time.monotonic() + 300  # generous: the machine may be loaded
    while time.monotonic() < deadline:
        value = page.get_attribute("#progress", "value")
        if value:
            progress_values.add(value)
        if page.locator("#result-image").count() and page.evaluate(
            "() => { const i = document.querySelector('#result-image');"
            " return !!(i && i.complete && i.naturalWidth); }"
        ):
            break
        page.wait_for_timeout(50)
    numeric = sorted(float(v) for v in progress_values)
    assert len([v for v in numeric if 0 < v < 40]) >= 2, f"the bar moved: {numeric}"
    size = page.evaluate(
        "() => { const i = document.querySelector('#result-image');"
        " return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert size == [768, 1024]
    assert "7" in page.text_content("#result-seed")
    assert any(path.endswith("/stream") for path in paths), paths
    assert not any(path.endswith("/status") for path in paths), "followed by stream, no polls"
    # On the phone-sized screen the result is on the first screenful, above the form.
    top = page.evaluate(
        "() => document.querySelector('#result-image').getBoundingClientRect().top + window.scrollY"
    )
    assert top < 900, f"the result starts {top} px down the page"
    assert_small_thumbnail_beside_its_prompt(page, server, 'A neon sign that reads "OVIS"')
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # A second job, cancelled from the page while it runs.
    page.select_option("#field-image_size", "square_hd")
    page.fill("#field-num_inference_steps", "50")
    page.click("#submit")
    page.wait_for_function(
        "() => document.querySelector('#status').textContent.toLowerCase().includes('step')",
        timeout=120_000,
    )
    page.click("#cancel")
    page.wait_for_function(
        "() => document.querySelector('#status').textContent.toLowerCase().includes('cancel')",
        timeout=60_000,
    )
    page.close()


def assert_small_thumbnail_beside_its_prompt(
    page: Any, server: InProcessServer, prompt: str
) -> None:
    """The gallery's newest tile: the server's small JPEG of the image (signed as the file
    link is), and the start of the prompt beside it."""
    tile = page.locator("#gallery .card").first
    tile.locator("img").wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('#gallery .card img');"
        " return !!(i && i.complete && i.naturalWidth); }",
        timeout=30_000,
    )
    assert tile.locator(".prompt").text_content() == prompt
    source = tile.locator("img").get_attribute("src")
    assert source.startswith("/playground/thumbnails/"), source
    assert "signature=" in source, source
    full = tile.locator("a").get_attribute("href")
    with server.client() as anonymous:
        thumbnail = anonymous.get(source)
        assert thumbnail.status_code == 200
        assert thumbnail.headers["content-type"] == "image/jpeg"
        assert len(thumbnail.content) < 100_000, len(thumbnail.content)
        assert len(anonymous.get(full).content) > 10 * len(thumbnail.content)
        with Image.open(io.BytesIO(thumbnail.content)) as image:
            assert max(image.size) == 256
        # The same signature as the file's link: a forged or missing one is refused.
        forged = re.sub(r"signature=[^&]+", "signature=AAAA", source)
        assert anonymous.get(forged).status_code == 403
        assert anonymous.get(source.split("?")[0]).status_code == 403


def test_a_bad_token_gets_a_clear_message(server: InProcessServer, browser: Any) -> None:
    page = browser.new_page()
    page.goto(server.base_url + "/")
    # Once the model has loaded: its load ends by setting the message, as a token's would.
    page.wait_for_selector("#field-prompt")
    page.fill("#token", "ovis_this-token-does-not-exist")
    page.dispatch_event("#token", "change")
    page.wait_for_function(
        "() => document.querySelector('#message').textContent.includes('401')", timeout=30_000
    )
    assert "token" in page.text_content("#message").lower()
    page.close()


PAGE_MODEL = "/playground/models/aidc-ai/ovis-image"


def assert_security_headers(headers: dict[str, str], where: str) -> None:
    policy = headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy, (where, policy)
    assert "'unsafe-inline'" not in policy, (where, policy)
    assert "frame-ancestors 'none'" in policy, (where, policy)
    assert headers.get("x-content-type-options") == "nosniff", where
    assert headers.get("referrer-policy") == "no-referrer", where


def storage(page: Any) -> dict[str, str | None]:
    return page.evaluate(  # type: ignore[no-any-return]
        "() => ({session: sessionStorage.getItem('ovis-server-token'),"
        " local: localStorage.getItem('ovis-server-token')})"
    )


def test_the_form_shows_before_a_token_and_submitting_asks_for_one(
    server: InProcessServer, browser: Any
) -> None:
    token = server.token("no-token-yet")
    context = browser.new_context()
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    responses: dict[str, dict[str, str]] = {}
    page.on("response", lambda r: responses.setdefault(urlsplit(r.url).path, r.all_headers()))
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)

    page.goto(server.base_url + "/")
    # The form is built from the public model description, with no token in sight.
    page.wait_for_selector("#field-prompt")
    assert page.input_value("#token") == ""
    assert page.locator("#field-num_inference_steps").input_value() == "28"
    assert page.is_enabled("#submit")
    # A text-to-image model: no image upload, no LoRA rows.
    assert page.locator(".image-field, .rows-field").count() == 0
    # A short prompt to start from (not the schema's page-long example), and help in plain
    # words: no Markdown backticks, no "null".
    assert 0 < len(page.input_value("#field-prompt")) <= 200
    help_text = page.text_content("#fields")
    assert "`" not in help_text, help_text
    assert "null" not in help_text.lower(), help_text
    # The model picker lists the served models.
    assert page.eval_on_selector_all("#model option", "o => o.map(x => x.value)") == [
        "aidc-ai/ovis-image"
    ]

    page.fill("#field-prompt", "a lighthouse at dusk")
    page.fill("#field-num_inference_steps", "1")
    page.select_option("#field-image_size", "square")
    page.click("#submit")
    page.wait_for_function(
        "() => document.querySelector('#message').textContent.includes('token')", timeout=10_000
    )
    assert page.evaluate("() => document.activeElement.id") == "token"
    assert page.get_attribute("#token", "aria-invalid") == "true"
    assert posts == [], "nothing is submitted without a token"

    # Pasting the token (an input event, no change event, no click) sends the submit it
    # asked for.
    page.fill("#token", token)
    page.wait_for_function(
        "() => { const i = document.querySelector('#result-image');"
        " return !!(i && !i.hidden && i.complete && i.naturalWidth); }",
        timeout=120_000,
    )
    assert len(posts) == 1
    # Kept for this tab only, until "remember" is ticked; unticking forgets it again.
    assert storage(page) == {"session": token, "local": None}
    page.check("#remember")
    assert storage(page) == {"session": None, "local": token}
    remembered = context.new_page()
    remembered.goto(server.base_url + "/")
    assert remembered.input_value("#token") == token
    assert remembered.is_checked("#remember")
    remembered.close()
    page.uncheck("#remember")
    assert storage(page) == {"session": token, "local": None}

    for path in ("/", "/static/playground.js", "/static/playground.css", PAGE_MODEL):
        assert path in responses, sorted(responses)
        assert_security_headers(responses[path], path)
    violations = [line for line in console if "Content Security Policy" in line]
    assert violations == []
    context.close()


def test_the_model_picker_offers_every_served_model(
    fresh_server: ServerFactory, browser: Any
) -> None:
    """With --extra-models, the picker lists them and the form is drawn from the chosen
    model's own description; the public list shows no weights."""
    server = fresh_server(no_worker=True, extra_models="acme/ovis-ft=/srv/private/ovis-ft")
    with server.client() as anonymous:
        listed = anonymous.get("/playground/models")
        assert listed.status_code == 200
        assert [row["model_id"] for row in listed.json()["models"]] == [
            "aidc-ai/ovis-image",
            "acme/ovis-ft",
        ]
        assert "/srv/private" not in listed.text
        assert "input_schema" not in listed.text
    token = server.token("picker")
    page = browser.new_page()
    asked: list[str] = []
    page.on("request", lambda r: asked.append(f"{r.method} {urlsplit(r.url).path}"))
    page.goto(server.base_url + "/")
    page.wait_for_selector("#field-prompt")
    options = page.eval_on_selector_all("#model option", "o => o.map(x => x.value)")
    assert options == ["aidc-ai/ovis-image", "acme/ovis-ft"]
    page.select_option("#model", "acme/ovis-ft")
    page.wait_for_function(
        "() => document.querySelector('#model-name').textContent.includes('acme/ovis-ft')",
        timeout=10_000,
    )
    assert "GET /playground/models/acme/ovis-ft" in asked
    page.wait_for_selector("#field-prompt")
    page.fill("#field-prompt", "a fine-tune's lighthouse")
    # The token typed and Generate clicked at once, before the field settles.
    page.evaluate(
        "token => { const field = document.querySelector('#token'); field.value = token;"
        " field.dispatchEvent(new Event('input')); document.querySelector('#submit').click(); }",
        token,
    )
    page.wait_for_function(
        "() => /queue/i.test(document.querySelector('#status').textContent)", timeout=10_000
    )
    assert "POST /v1/models/acme/ovis-ft" in asked
    # The token typed just before the click was taken in by the submit: settling later, it
    # does not stop the page following the job.
    page.wait_for_timeout(1000)
    assert "Stopped following" not in page.text_content("#status")
    assert sum(entry.startswith("POST ") for entry in asked) == 1
    page.close()


def test_head_of_the_playground_answers_200(server: InProcessServer) -> None:
    with server.client() as anonymous:
        head = anonymous.head("/")
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/html")
        assert head.content == b""


def test_every_response_carries_the_security_headers(server: InProcessServer) -> None:
    token = server.token("headers")
    with server.client(token) as client:
        for path in ("/healthz", "/v1/models", "/v1/requests/unknown/status", "/openapi.json"):
            response = client.get(path)
            assert_security_headers(dict(response.headers), path)
    # The playground's model description needs no token; the API's does.
    with server.client() as anonymous:
        assert anonymous.get(PAGE_MODEL).json()["input_schema"]["required"] == ["prompt"]
        assert anonymous.get("/v1/models/aidc-ai/ovis-image").status_code == 401


# --- image inputs and LoRA rows, driven by each model's schema ---------------------------------

Z_IMAGE_EDIT = f"{Z_IMAGE_ID}/image-to-image"
Z_IMAGE_LORA = f"{Z_IMAGE_ID}/lora"
PHONE = {"width": 390, "height": 900}


def png(width: int, height: int, colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def z_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """Z-Image-Turbo's tiny build with a worker: it serves the image-to-image variant too."""
    settings = Settings(
        model="tiny", model_ids=[Z_IMAGE_ID], data_dir=tmp_path_factory.mktemp("z-playground")
    )
    server = InProcessServer(settings)
    try:
        server.wait_until_ready(timeout=600)  # generous: the machine may be loaded
        yield server
    finally:
        server.stop()


def fits_the_screen(page: Any) -> bool:
    """Nothing wider than the viewport: no sideways scrolling on a phone."""
    return bool(
        page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
    )


def preview_size(page: Any) -> list[int]:
    page.wait_for_function(
        "() => { const i = document.querySelector('#field-image_url-preview');"
        " return !!(i && i.complete && i.naturalWidth && !i.closest('[hidden]')); }",
        timeout=10_000,
    )
    size: list[int] = page.evaluate(
        "() => { const i = document.querySelector('#field-image_url-preview');"
        " return [i.naturalWidth, i.naturalHeight]; }"
    )
    return size


def test_image_to_image_takes_a_file_picked_or_dropped_and_completes(
    z_server: InProcessServer, browser: Any
) -> None:
    token = z_server.token("upload")
    page = browser.new_page(viewport=PHONE)
    page.goto(z_server.base_url + "/")
    page.wait_for_selector("#field-prompt")
    options = page.eval_on_selector_all("#model option", "o => o.map(x => x.value)")
    assert {Z_IMAGE_ID, Z_IMAGE_EDIT} <= set(options), options
    assert page.input_value("#model") == Z_IMAGE_ID
    # The text-to-image model has no image input and no LoRA rows.
    assert page.locator("#field-image_url-file").count() == 0
    assert page.locator(".rows-field").count() == 0

    page.select_option("#model", Z_IMAGE_EDIT)
    page.wait_for_selector("#field-image_url-file")
    assert page.locator(".rows-field").count() == 0
    assert page.locator("#field-strength").input_value() == "0.6"
    assert page.locator("#field-image_size").input_value() == "auto"  # the const, offered
    assert page.locator("#field-image_url-preview").is_hidden()
    # Labelled: the file input and the URL field each have a label of their own.
    for control in ("field-image_url-file", "field-image_url"):
        assert page.locator(f"label[for='{control}']").count() == 1

    posts: list[Any] = []
    page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
    page.fill("#token", token)
    page.dispatch_event("#token", "change")
    page.fill("#field-prompt", "the same tile, at night")
    # Without an image the form's own check stops the submit: nothing is sent.
    page.click("#submit")
    page.wait_for_timeout(300)
    assert page.evaluate(
        "() => document.querySelector('#field-image_url-file').validity.valueMissing"
    )
    assert posts == []

    # Too large, or not an image: said at once, in the field, and nothing is kept.
    page.set_input_files(
        "#field-image_url-file",
        files=[{"name": "huge.png", "mimeType": "image/png", "buffer": bytes(13_000_000)}],
    )
    page.wait_for_function(
        "() => document.querySelector('#field-image_url-error').textContent.includes('13.0 MB')"
    )
    assert "up to 12.0 MB" in page.text_content("#field-image_url-error")
    assert page.locator("#field-image_url-preview").is_hidden()
    page.set_input_files(
        "#field-image_url-file",
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"just some text"}],
    )
    page.wait_for_function(
        "() => document.querySelector('#field-image_url-error').textContent.includes('notes.png')"
    )
    assert "not a PNG, JPEG or WEBP image" in page.text_content("#field-image_url-error")
    assert page.locator("#field-image_url-preview").is_hidden()

    # A small PNG from the file picker: its preview, size and name.
    picked = png(64, 48, "teal")
    page.set_input_files(
        "#field-image_url-file",
        files=[{"name": "tile.png", "mimeType": "image/png", "buffer": picked}],
    )
    assert preview_size(page) == [64, 48]
    assert page.text_content("#field-image_url-error") == ""
    assert "tile.png" in page.text_content("#field-image_url-box figcaption")
    assert "64\u00d748" in page.text_content("#field-image_url-box figcaption")

    # Another, pasted into the page, takes its place; then one dropped on the drop zone.
    def files_of(data: bytes, name: str) -> Any:
        return page.evaluate_handle(
            "([bytes, name]) => { const t = new DataTransfer();"
            " t.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'}));"
            " return t; }",
            [list(data), name],
        )

    pasted = files_of(png(30, 20, "purple"), "pasted.png")
    page.evaluate(
        "t => document.querySelector('#field-prompt')"
        ".dispatchEvent(new ClipboardEvent('paste', {clipboardData: t, bubbles: true}))",
        pasted,
    )
    assert preview_size(page) == [30, 20]
    assert page.input_value("#field-prompt") == "the same tile, at night"  # text untouched
    dropped = png(40, 40, "orange")
    transfer = files_of(dropped, "drop.png")
    page.dispatch_event(".dropzone", "dragover", {"dataTransfer": transfer})
    page.dispatch_event(".dropzone", "drop", {"dataTransfer": transfer})
    page.wait_for_function(
        "() => document.querySelector('#field-image_url-box figcaption')"
        ".textContent.includes('40\u00d740')"
    )
    assert preview_size(page) == [40, 40]
    assert fits_the_screen(page)

    page.select_option("#field-image_size", "square")
    page.fill("#field-num_inference_steps", "2")
    page.fill("#field-seed", "5")
    page.click("#submit")
    page.wait_for_function(
        "() => { const i = document.querySelector('#result-image');"
        " return !!(i && !i.hidden && i.complete && i.naturalWidth); }",
        timeout=300_000,  # generous: the machine may be loaded
    )
    (post,) = posts
    assert urlsplit(post.url).path == f"/v1/models/{Z_IMAGE_EDIT}"
    sent = post.post_data_json
    assert sent["image_url"] == "data:image/png;base64," + base64.b64encode(dropped).decode()
    assert sent["strength"] == 0.6
    size = page.evaluate(
        "() => { const i = document.querySelector('#result-image');"
        " return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert size == [512, 512]
    assert "5" in page.text_content("#result-seed")
    # Removing the image brings back the URL field and the form's check.
    page.click("#field-image_url-box button:has-text('Remove image')")
    assert page.locator("#field-image_url-preview").is_hidden()
    assert page.evaluate("() => document.activeElement.id") == "field-image_url-file"
    assert page.is_enabled("#field-image_url")
    page.close()


def lora_schema(base: dict[str, Any]) -> dict[str, Any]:
    """Z-Image-Turbo's text-to-image schema plus RunComfy's ``loras``, shaped as pydantic
    writes such a field (the LoRA id's own schema, where this server has it, is used too)."""
    schema = {**base, "properties": dict(base["properties"])}
    schema["properties"]["loras"] = {
        "title": "Loras",
        "description": "LoRAs to apply, at most 3.",
        "type": "array",
        "maxItems": 3,
        "default": [],
        "items": {
            "title": "LoraWeight",
            "type": "object",
            "additionalProperties": False,
            "required": ["path"],
            "properties": {
                "path": {"title": "Path", "type": "string", "minLength": 1},
                "scale": {
                    "title": "Scale",
                    "type": "number",
                    "minimum": 0,
                    "maximum": 4,
                    "default": 1,
                },
            },
        },
    }
    return schema


def test_lora_rows_appear_for_a_schema_with_loras(z_server: InProcessServer, browser: Any) -> None:
    """Rows from the schema alone: the page is shown a model whose schema has ``loras`` (the
    id's own, where the server serves it; else the text-to-image schema with RunComfy's
    field added) and builds add/remove rows for it, at most 3, by keyboard too."""
    with z_server.client() as anonymous:
        listing = anonymous.get("/playground/models").json()
        served = anonymous.get(f"/playground/models/{Z_IMAGE_LORA}")
        base = anonymous.get(f"/playground/models/{Z_IMAGE_ID}").json()
    if served.status_code == 200 and "loras" in served.json()["input_schema"]["properties"]:
        detail = served.json()
    else:
        detail = {**base, "model_id": Z_IMAGE_LORA, "display_name": "Z-Image-Turbo LoRA",
                  "input_schema": lora_schema(base["input_schema"])}  # fmt: skip
        listing["models"].append({k: v for k, v in detail.items() if k != "input_schema"})
    page = browser.new_page(viewport=PHONE)
    page.route(
        "**/playground/models",
        lambda route: route.fulfill(json=listing),
    )
    page.route(
        f"**/playground/models/{Z_IMAGE_LORA}",
        lambda route: route.fulfill(json=detail),
    )
    # The operator's LoRAs, which GET /v1/loras lists to token holders, are offered as
    # suggestions (the route's answer is made up where this server has no such route).
    loras_dir = z_server.data_dir / "loras"
    loras_dir.mkdir(exist_ok=True)
    for name in ("my-style", "watercolour"):
        (loras_dir / f"{name}.safetensors").write_bytes(b"")
    mine = {"loras": [{"name": "my-style"}, {"name": "watercolour"}], "downloads": []}

    def list_loras(route: Any) -> None:
        real = route.fetch()
        if real.status == 404:
            route.fulfill(json=mine)
        else:
            route.fulfill(response=real)

    page.route("**/v1/loras", list_loras)
    page.goto(z_server.base_url + "/")
    page.wait_for_selector("#field-prompt")
    assert page.locator("#field-loras").count() == 0  # the text-to-image model
    page.select_option("#model", Z_IMAGE_LORA)
    page.wait_for_selector("#field-loras")
    assert page.locator("#field-loras legend").text_content() == "LoRAs"
    assert page.locator("#field-loras .row").count() == 0  # optional: none to start with

    # By keyboard: the add button, Enter, and the new row's path has the focus.
    page.focus("#field-loras-add")
    page.keyboard.press("Enter")
    focused = page.evaluate("() => document.activeElement.id")
    assert focused.endswith("-path"), focused
    assert page.locator(f"label[for='{focused}']").text_content() == "Name or path"
    page.keyboard.type("my-style")
    page.click("#field-loras-add")
    page.click("#field-loras-add")
    assert page.locator("#field-loras .row").count() == 3
    assert page.is_disabled("#field-loras-add")  # at most 3
    scales = page.locator("#field-loras .row input[name='scale']")
    assert [scales.nth(i).input_value() for i in range(3)] == ["1", "1", "1"]
    assert scales.first.get_attribute("min") == "0"
    assert scales.first.get_attribute("max") == "4"
    assert fits_the_screen(page)
    # Remove the second: two rows, the add button back, the focus on the row that moved up.
    page.click("#field-loras .row >> nth=1 >> button")
    assert page.locator("#field-loras .row").count() == 2
    assert page.is_enabled("#field-loras-add")
    labels = page.eval_on_selector_all(
        "#field-loras .row button", "b => b.map(x => x.getAttribute('aria-label'))"
    )
    assert labels == ["Remove LoRA 1", "Remove LoRA 2"]
    second = page.locator("#field-loras .row").nth(1)
    assert page.evaluate("() => document.activeElement.name") == "path"
    second.locator("input[name='path']").fill("alibaba-pai/some-lora")
    second.locator("input[name='scale']").fill("0.5")

    posts: list[Any] = []
    page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
    page.fill("#token", z_server.token("loras"))
    page.dispatch_event("#token", "change")
    page.wait_for_function(
        "() => document.querySelectorAll('#field-loras-names option').length === 2",
        timeout=10_000,
    )
    suggested = page.eval_on_selector_all("#field-loras-names option", "o => o.map(x => x.value)")
    assert suggested == ["my-style", "watercolour"]
    assert second.locator("input[name='path']").get_attribute("list") == "field-loras-names"
    page.fill("#field-prompt", "a lighthouse")
    page.click("#submit")
    wait_for_post = time.monotonic() + 10
    while not posts and time.monotonic() < wait_for_post:
        page.wait_for_timeout(50)
    (post,) = posts
    assert urlsplit(post.url).path == f"/v1/models/{Z_IMAGE_LORA}"
    assert json.loads(post.post_data)["loras"] == [
        {"path": "my-style", "scale": 1},
        {"path": "alibaba-pai/some-lora", "scale": 0.5},
    ]
    page.close()
