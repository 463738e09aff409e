"""The prompt RPCs, for the servicer: list, get, publish, select.

The gateway authenticates the operator, checks the scope (``ops:read`` to read, ``admin`` to
publish and select, ``platform:admin`` for shared versions) and audits every change; the router
enforces ownership: a tenant sees and selects platform versions and its own, never another
tenant's (NOT_FOUND, exactly like a version never published).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.kit.errors import abort, abort_invalid
from services.kit.scopes import PLATFORM_ADMIN
from services.router.models.prompts import (
    KINDS,
    Prompt,
    PromptError,
    PromptNotFoundError,
    PromptStore,
    check,
)
from toolmesh.common.v1 import common_pb2
from toolmesh.router.v1 import router_pb2

MAX_NAME_CHARS = 64
MAX_VERSION = 2**31 - 1


def prompt_ref(prompt: Prompt) -> router_pb2.PromptRef:
    return router_pb2.PromptRef(name=prompt.name, version=prompt.version, digest=prompt.digest)


def _message(prompt: Prompt, *, full: bool, selected: bool) -> router_pb2.PromptVersion:
    created = Timestamp()
    created.FromDatetime(prompt.created_at)
    return router_pb2.PromptVersion(
        ref=prompt_ref(prompt),
        template=prompt.template if full else "",
        params_json=_params_json(prompt),
        tenant=prompt.tenant,
        created_at=created,
        created_by=prompt.created_by,
        selected=selected,
    )


def _params_json(prompt: Prompt) -> str:
    return json.dumps(dict(prompt.params), sort_keys=True) if prompt.params else ""


# (owner, prompt name) -> the id of a release of that selection in progress, else None.
ReleaseInProgress = Callable[[str, str], Awaitable[str | None]]


async def _none(_owner: str, _name: str) -> str | None:
    return None


class PromptAdmin:
    def __init__(self, store: PromptStore, releasing: ReleaseInProgress = _none) -> None:
        self.store = store
        self._releasing = releasing

    async def _not_releasing(self, owner: str, name: str, context: aio.ServicerContext) -> None:
        """A selection under a release changes only through that release."""
        release = await self._releasing(owner, name)
        if release is not None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"release {release} of prompt {name} is in progress: promote or abort it first",
            )

    async def _tenant(self, caller: common_pb2.Caller, context: aio.ServicerContext) -> str:
        if not caller.tenant:
            await abort_invalid(context, [("caller.tenant", "required")])
        return caller.tenant

    async def _name(self, name: str, context: aio.ServicerContext, *, required: bool) -> None:
        if required and not name:
            await abort_invalid(context, [("name", "required")])
        if name and name not in KINDS:
            await abort_invalid(context, [("name", f"one of {', '.join(sorted(KINDS))}")])

    async def _shared(self, caller: common_pb2.Caller, context: aio.ServicerContext) -> None:
        if PLATFORM_ADMIN not in caller.scopes:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"a shared (platform) prompt version needs the scope {PLATFORM_ADMIN}",
            )

    async def list(
        self, request: router_pb2.ListPromptsRequest, context: aio.ServicerContext
    ) -> list[router_pb2.PromptVersion]:
        tenant = await self._tenant(request.caller, context)
        await self._name(request.name, context, required=False)
        versions = await self.store.versions(tenant, request.name)
        selected = {}
        for name in {p.name for p in versions}:
            try:
                selected[name] = (await self.store.selected(tenant, name)).version
            except PromptNotFoundError:
                continue
        return [
            _message(p, full=False, selected=selected.get(p.name) == p.version) for p in versions
        ]

    async def get(
        self, request: router_pb2.GetPromptRequest, context: aio.ServicerContext
    ) -> router_pb2.PromptVersion:
        tenant = await self._tenant(request.caller, context)
        await self._name(request.name, context, required=True)
        if not 0 <= request.version <= MAX_VERSION:
            await abort_invalid(context, [("version", "0 (the selected one) or a version number")])
        try:
            current = await self.store.selected(tenant, request.name)
            prompt = (
                current
                if request.version in (0, current.version)
                else await self.store.get(tenant, request.name, request.version)
            )
        except PromptNotFoundError as error:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(error))
        return _message(prompt, full=True, selected=prompt.version == current.version)

    async def publish(
        self, request: router_pb2.PublishPromptRequest, context: aio.ServicerContext
    ) -> tuple[router_pb2.PromptVersion, bool]:
        tenant = await self._tenant(request.caller, context)
        if request.shared:
            await self._shared(request.caller, context)
        try:
            params = check(request.name, request.template, request.params_json)
        except PromptError as error:
            await abort_invalid(context, [(error.field, error.problem)])
        owner = "" if request.shared else tenant
        if not request.keep_selection:
            await self._not_releasing(owner, request.name, context)
        prompt, created = await self.store.publish(
            request.name, request.template, params, tenant=owner, by=request.caller.subject
        )
        if request.keep_selection:
            current = await self.store.selected(tenant, prompt.name)
            return _message(prompt, full=True, selected=current.version == prompt.version), created
        await self.store.select(owner, prompt.name, prompt.version, by=request.caller.subject)
        return _message(prompt, full=True, selected=True), created

    async def select(
        self, request: router_pb2.SelectPromptRequest, context: aio.ServicerContext
    ) -> router_pb2.PromptVersion:
        tenant = await self._tenant(request.caller, context)
        await self._name(request.name, context, required=True)
        if not 1 <= request.version <= MAX_VERSION:
            await abort_invalid(context, [("version", "a version number, 1 or more")])
        if request.shared:
            await self._shared(request.caller, context)
        owner = "" if request.shared else tenant
        await self._not_releasing(owner, request.name, context)
        try:
            prompt = await self.store.get(owner, request.name, request.version)
            await self.store.select(owner, request.name, request.version, by=request.caller.subject)
        except PromptNotFoundError as error:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(error))
        return _message(prompt, full=True, selected=True)
