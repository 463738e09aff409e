"""The gates a candidate passes before any traffic reaches it; each answers one Check.

- contract: the candidate's contract against the stable version's (services.router.compat,
  the same rule the backend approval applies). A breaking change passes only with a new major
  version and the operator's consent (``allow_breaking``).
- drift: a built-in candidate must match its pinned fingerprint (contracts.lock.json); a
  backend candidate must be the contract the backend serves now.
- examples: every example declared with the candidate (or supplied at start for a backend
  tool) is run through the real Executor and must answer as stated. A write tool's examples
  are not run: they would write.
- routing rules: the candidate rules file's ``[[examples]]`` (prompt -> tool and arguments).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from services.router.compat import breaking_changes, major_of
from services.router.invoke import Executor, ToolRunError
from services.router.registry import Example, SideEffect, Tool, ToolContext
from services.router.releases.model import Check
from services.router.routing import ToolLookup, ToolRouter
from services.router.rules import RuleExample

# A refusal an example may expect: the tool declined the arguments.
_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
# Failing examples named in the gate's detail at most.
_SHOWN = 3


def contract_gate(stable: Tool, candidate: Tool, *, allow_breaking: bool) -> Check:
    old, new = stable.spec, candidate.spec
    breaks = breaking_changes(
        old_input=old.input_schema,
        new_input=new.input_schema,
        old_output=old.output_schema,
        new_output=new.output_schema,
        old_side_effect=old.side_effect.value,
        new_side_effect=new.side_effect.value,
    )
    if not breaks:
        return Check("contract", True, f"compatible with {old.version}")
    what = "; ".join(breaks)
    try:
        new_major = major_of(new.version) != major_of(old.version)
    except ValueError:
        new_major = False
    if new_major and allow_breaking:
        return Check(
            "contract",
            True,
            f"breaking against {old.version} ({what}): accepted, a new major version and "
            "allow_breaking",
        )
    missing = []
    if not new_major:
        missing.append(f"a new major version (not {new.version} after {old.version})")
    if not allow_breaking:
        missing.append("the operator's consent (--allow-breaking)")
    return Check(
        "contract",
        False,
        f"{new.version} breaks callers of {old.version}: {what}; a breaking change needs "
        + " and ".join(missing),
    )


def builtin_drift_gate(candidate: Tool, lock: Mapping[str, str]) -> Check:
    pinned = lock.get(candidate.key)
    if pinned is None:
        return Check(
            "drift", True, "not in the published catalog's lock (a plugin tool, its owner's)"
        )
    if pinned != candidate.spec.fingerprint():
        return Check(
            "drift",
            False,
            f"{candidate.key} differs from its fingerprint in contracts.lock.json",
        )
    return Check("drift", True, "matches its pinned fingerprint")


def backend_drift_gate(candidate: Tool, live_fingerprint: str | None) -> Check:
    assert candidate.origin is not None
    if live_fingerprint is None:
        return Check(
            "drift",
            False,
            f"backend {candidate.origin.backend} has not described the tool since it started; "
            "retry once it is connected",
        )
    if live_fingerprint != candidate.origin.fingerprint:
        return Check(
            "drift",
            False,
            f"the backend now describes the tool differently than {candidate.spec.version} "
            f"(fingerprint {live_fingerprint[:12]}, not {candidate.origin.fingerprint[:12]}); "
            "approve what it serves as a new version and release that",
        )
    return Check("drift", True, "the backend serves exactly this contract")


def parse_examples(text: str) -> list[Example]:
    """Examples supplied at start (a JSON array); ValueError says what is wrong."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("not valid JSON") from None
    if not isinstance(data, list) or len(data) > 100:
        raise ValueError("a JSON array of at most 100 examples")
    examples = []
    for i, item in enumerate(data):
        try:
            examples.append(Example.from_mapping(item))
        except ValueError as error:
            raise ValueError(f"example {i}: {error}") from None
    return examples


async def examples_gate(
    candidate: Tool,
    examples: Sequence[Example],
    executor: Executor,
    context: ToolContext,
) -> Check:
    if not examples:
        return Check("examples", True, "no examples declared")
    if candidate.spec.side_effect is SideEffect.WRITE:
        return Check(
            "examples", True, f"{len(examples)} examples not run: a write tool's example writes"
        )
    problems = []
    for i, example in enumerate(examples):
        problem = await _run_example(candidate, example, executor, context, i)
        if problem:
            problems.append(f"example {i} {json.dumps(example.arguments)[:80]}: {problem}")
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        return Check(
            "examples",
            False,
            f"{len(problems)} of {len(examples)} examples failed: {shown}{more}",
            len(problems),
            0,
        )
    return Check("examples", True, f"all {len(examples)} examples passed", 0, 0)


async def _run_example(
    tool: Tool, example: Example, executor: Executor, context: ToolContext, index: int
) -> str | None:
    arguments: dict[str, Any] = json.loads(json.dumps(example.arguments))
    invalid = next(iter(tool.input_validator.iter_errors(arguments)), None)
    if invalid is not None:
        return f"the arguments do not fit the input schema ({invalid.message[:120]})"
    ctx = ToolContext(
        tenant=context.tenant,
        session_id=context.session_id,
        request_id=f"{context.request_id}-{index}",
        idempotency_key="",
        notes=context.notes,
        now=context.now,
    )
    try:
        run = await executor.run(tool, arguments, ctx, tool.spec.timeout_ms / 1000)
    except ToolRunError as error:
        if example.refused and error.code in _REFUSALS:
            return None
        return example.problem(None, f"{error.code.name}: {error.message}")
    return example.problem(run.output)


def routing_examples_gate(
    router: ToolRouter, examples: Sequence[RuleExample], lookup: ToolLookup
) -> Check:
    if not examples:
        return Check("examples", True, "the rules file declares no examples")
    problems = []
    for i, example in enumerate(examples):
        decision = router.route(example.prompt, ["*"], "", lookup)
        picked = decision.best.tool.spec.name if decision.matched and decision.best else ""
        if picked != example.tool:
            problems.append(
                f"example {i} {example.prompt[:60]!r}: expected {example.tool or 'no tool'}, "
                f"got {picked or 'no tool'}"
            )
            continue
        arguments = decision.best.arguments if decision.best and decision.matched else {}
        wrong = [k for k, v in example.arguments.items() if arguments.get(k) != v]
        if wrong:
            problems.append(
                f"example {i} {example.prompt[:60]!r}: argument {wrong[0]} = "
                f"{json.dumps(arguments.get(wrong[0]))[:40]}, expected "
                f"{json.dumps(example.arguments[wrong[0]])[:40]}"
            )
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        return Check(
            "examples",
            False,
            f"{len(problems)} of {len(examples)} examples failed: {shown}",
            len(problems),
            0,
        )
    return Check("examples", True, f"all {len(examples)} examples routed as stated", 0, 0)
