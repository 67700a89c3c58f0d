"""The embedded broker: kombu's filesystem transport with atomic message files.

kombu 5.7's filesystem channel creates `<name>.msg` and then writes it; a
consumer listing the folder in between moves and reads an empty file, fails to
decode it and the worker stops ("Unrecoverable error: JSONDecodeError") with
the message lost. Here a message is written under a temporary name and renamed
into place, which is atomic on one filesystem, so a reader only ever sees
complete messages.
"""
from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        temp = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(temp, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(temp, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
