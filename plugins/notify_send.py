"""What the notify plugin sends, and how: webhook and chat bodies, email messages, transports.

Kept apart from the plugin's routing and queues (plugins/notify.py) so each half reads on its
own. Nothing here touches the database or the event loop's state: a transport gets a
target's settings and the messages to send, and either returns or raises :class:`Retry`
(try again later: the receiver is down or busy) or :class:`Refused` (trying again would get
the same answer).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import smtplib
import ssl
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError

from quotaserver import __version__

#: Delivery ids are UUIDs derived from (target, seqs): the same on every retry and after a
#: restart, so a receiver can drop repeats.
_DELIVERY_NAMESPACE = uuid.UUID("0b7f3c1e-5d3a-4c52-9a47-6f1d2e8b9c10")
#: HTTP answers worth another try besides 5xx: a timeout and "slow down".
RETRY_STATUSES = frozenset({408, 429})
SEVERITY_MARK = {"critical": "CRITICAL", "high": "HIGH", "medium": "MEDIUM", "low": "LOW"}


class Retry(Exception):
    """The delivery may succeed later; ``after`` is the receiver's Retry-After, if any."""

    def __init__(self, message: str, after: float | None = None):
        super().__init__(message)
        self.after = after


class Refused(Exception):
    """The receiver refused the delivery for good (a 4xx, a rejected recipient)."""


def delivery_id(target: str, messages: list[Any]) -> str:
    seqs = f"{messages[0].seq}" if len(messages) == 1 else f"{messages[0].seq}-{messages[-1].seq}"
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{target}:{seqs}"))


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of timestamp + "." + body>`` (X-Quotaserver-Signature)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


# -- text --------------------------------------------------------------------------------
def headline(message: Any) -> str:
    """One line for a chat message, an email subject or a digest entry."""
    data = message.data
    if message.type == "violation":
        return f"Quota violation: {data.get('message') or data.get('username')}"
    status = data.get("status")
    mark = "RESOLVED" if status == "resolved" else SEVERITY_MARK.get(data.get("severity"), "")
    user = f" ({data['username']})" if data.get("username") else ""
    return f"[{mark}] {data.get('alert_type')}: {data.get('message')}{user}"


def details(message: Any) -> list[tuple[str, str]]:
    """Label and value pairs below the headline (text only)."""
    data = message.data
    pairs = [("event", f"{message.type} #{message.seq}"), ("at", message.timestamp)]
    if message.type == "alert":
        pairs.append(("status", str(data.get("status"))))
        if data.get("resolved_by"):
            pairs.append(("resolved by", str(data["resolved_by"])))
        if data.get("action") and data.get("status") != "resolved":
            pairs.append(("action", str(data["action"])))
    else:
        for key in ("command_type", "period", "limit", "attempted"):
            if key in data:
                pairs.append((key.replace("_", " "), str(data[key])))
    return pairs


# -- webhook and chat --------------------------------------------------------------------
def webhook_body(target: str, message: Any, delivery: str) -> bytes:
    """The event's envelope plus the delivery id and the target's name."""
    envelope = {
        "delivery_id": delivery,
        "target": target,
        "type": message.type,
        "seq": message.seq,
        "timestamp": message.timestamp,
        "data": message.data,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def chat_body(message: Any) -> bytes:
    """A Slack-compatible incoming-webhook body (Mattermost and Rocket.Chat read it too):
    ``text`` for notifications and clients without blocks, ``blocks`` for the layout."""
    title = headline(message)
    context = " · ".join(f"{label}: {value}" for label, value in details(message))
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_mrkdwn(title)}*"}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _mrkdwn(context)}]},
    ]
    return json.dumps({"text": title, "blocks": blocks}, separators=(",", ":")).encode()


def _mrkdwn(text: str) -> str:
    # Slack's three control characters; a username cannot turn into a mention or a link.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


async def post(
    client: AsyncHTTPClient,
    target: dict[str, Any],
    body: bytes,
    event_type: str,
    delivery: str,
) -> None:
    """POST ``body``, signed when the target has a secret; raise Retry or Refused."""
    timestamp = str(int(time.time()))  # fresh per attempt: receivers reject stale ones
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"quotaserver/{__version__}",
        "X-Quotaserver-Event": event_type,
        "X-Quotaserver-Delivery": delivery,
        "X-Quotaserver-Timestamp": timestamp,
    }
    if target.get("secret"):
        headers["X-Quotaserver-Signature"] = sign(target["secret"], timestamp, body)
    request = HTTPRequest(
        target["url"],
        method="POST",
        body=body,
        headers=headers,
        request_timeout=target["timeout"],
        connect_timeout=target["timeout"],
        follow_redirects=False,  # a redirect would move a signed body elsewhere
    )
    try:
        response = await client.fetch(request, raise_error=False)
    except (OSError, HTTPClientError, StreamClosedError) as exc:  # no HTTP answer at all
        raise Retry(f"{type(exc).__name__}: {exc}") from None
    if 200 <= response.code < 300:
        return
    if response.code == 599:  # Tornado: no HTTP answer (reset, timed out)
        raise Retry(f"{type(response.error).__name__}: {response.error}")
    text = f"HTTP {response.code}"
    if response.code >= 500 or response.code in RETRY_STATUSES:
        raise Retry(text, _retry_after(response.headers.get("Retry-After")))
    raise Refused(text)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: our own backoff will do


# -- email -------------------------------------------------------------------------------
def email_message(
    smtp: dict[str, Any], to: list[str], messages: list[Any], delivery: str
) -> EmailMessage:
    """One alert, or a digest of several: a plain-text and an HTML part."""
    if len(messages) == 1:
        subject = headline(messages[0])
    else:
        subject = f"quotaserver digest: {len(messages)} alerts"
    text_parts, html_parts = [], []
    for message in messages:
        pairs = details(message)
        text_parts.append(
            headline(message) + "\n" + "\n".join(f"  {label}: {value}" for label, value in pairs)
        )
        rows = "".join(
            f"<tr><th align='left'>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
            for label, value in pairs
        )
        html_parts.append(f"<h3>{html.escape(headline(message))}</h3><table>{rows}</table>")
    mail = EmailMessage()
    mail["Subject"] = subject
    mail["From"] = smtp["from"]
    mail["To"] = ", ".join(to)
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain="quotaserver")
    mail["X-Quotaserver-Delivery"] = delivery
    mail.set_content("\n\n".join(text_parts) + "\n")
    mail.add_alternative("<html><body>" + "".join(html_parts) + "</body></html>", subtype="html")
    return mail


def send_email(smtp: dict[str, Any], to: list[str], mail: EmailMessage) -> None:
    """Deliver over SMTP (blocking: run it on the plugin's thread pool)."""
    try:
        with smtplib.SMTP(smtp["host"], smtp["port"], timeout=smtp["timeout"]) as client:
            client.ehlo()
            if smtp["starttls"]:
                context = ssl.create_default_context(cafile=smtp.get("ca_file") or None)
                client.starttls(context=context)
                client.ehlo()
            if smtp.get("username"):
                client.login(smtp["username"], smtp.get("password") or "")
            client.send_message(mail, to_addrs=to)
    except smtplib.SMTPRecipientsRefused as exc:
        raise Refused(f"recipients refused: {', '.join(exc.recipients)}") from None
    except (smtplib.SMTPAuthenticationError, smtplib.SMTPNotSupportedError) as exc:
        raise Refused(f"{type(exc).__name__}: {exc}") from None
    except smtplib.SMTPResponseException as exc:
        if exc.smtp_code >= 500:
            raise Refused(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}") from None
        raise Retry(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}") from None
    except (OSError, smtplib.SMTPException) as exc:  # connection refused, TLS, timeouts
        raise Retry(f"{type(exc).__name__}: {exc}") from None
