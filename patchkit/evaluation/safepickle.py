"""Read a pickle of a plain-data object without executing it.

`read_restricted` walks the opcodes with `pickletools.genops` (which only decodes them) and runs a
small stack machine of its own over them. It builds str, int, float, bool, None, dict, list and
tuple values, and only the globals it is told about:

* ``objects``: classes whose instances are returned as :class:`PickledObject` (module, name and
  the BUILD state as a plain dict). The class is never imported.
* ``containers``: callables that REDUCE to a plain dict (``collections.OrderedDict``,
  ``collections.defaultdict``: their keys and values are what matters, not their behaviour).
* ``values``: globals that may only appear as arguments (``builtins.int``, a defaultdict factory).

Every other global, opcode or use of an allowed global is refused with a one-line
:class:`~patchkit.errors.DataError`, before anything is called: nothing in the file is ever run.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass, field

from ..errors import DataError

_CONTAINERS = frozenset({("collections", "OrderedDict"), ("collections", "defaultdict")})
_VALUES = frozenset({("builtins", "int")})

_PUSH_ARG = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                       "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


@dataclass(frozen=True)
class Global:
    """A global named by the pickle, kept as a name (never imported)."""

    module: str
    name: str


@dataclass
class PickledObject:
    """An instance of an allowed class: its class's name and its BUILD state."""

    module: str
    name: str
    state: dict = field(default_factory=dict)


def read_restricted(data: bytes, objects: frozenset[tuple[str, str]], *, where: str = "pickle",
                    containers: frozenset[tuple[str, str]] = _CONTAINERS,
                    values: frozenset[tuple[str, str]] = _VALUES) -> object:
    """The value a pickle describes, built from plain data only; see the module docstring."""

    def refuse(why: str) -> DataError:
        return DataError(f"{where}: refused to read: {why}; patchkit reads only plain-data pickles and never runs one", path=where)

    stack: list = []
    marks: list[list] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        nonlocal stack
        if not marks:
            raise refuse("a MARK is missing")
        items, stack = stack, marks.pop()
        return items

    def pop():
        if not stack:
            raise refuse("the stack is empty")
        return stack.pop()

    def top():
        if not stack:
            raise refuse("the stack is empty")
        return stack[-1]

    def make_global(module: str, name: str) -> Global:
        if (module, name) not in objects | containers | values:
            raise refuse(f"global {module}.{name} is not allowed")
        return Global(module, name)

    def check_key(k):
        if not isinstance(k, (str, int, float, bool, tuple, type(None))):
            raise refuse(f"a dict key of type {type(k).__name__}")
        return k

    try:
        ops = pickletools.genops(data)
        for op, arg, pos in ops:
            name = op.name
            if name in _PUSH_ARG:
                stack.append(arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "STOP":
                if len(stack) != 1 or marks:
                    raise refuse("the stack is not one value at STOP")
                result = stack.pop()
                if isinstance(result, Global):
                    raise refuse(f"the pickle is the global {result.module}.{result.name} itself")
                return result
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(top())
            elif name == "MEMOIZE":
                memo[len(memo)] = top()
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = top()
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise refuse(f"memo entry {arg} is read before it is written")
                stack.append(memo[int(arg)])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "DICT":
                items = pop_mark()
                stack.append({check_key(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)})
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n:
                    raise refuse(f"{name} needs {n} values")
                items = stack[-n:]
                del stack[-n:]
                stack.append(tuple(items))
            elif name in ("SETITEM", "SETITEMS"):
                items = [pop(), pop()][::-1] if name == "SETITEM" else pop_mark()
                target = stack[-1] if stack else None
                if not isinstance(target, dict) or len(items) % 2:
                    raise refuse(f"{name} on something that is not a dict")
                for i in range(0, len(items), 2):
                    target[check_key(items[i])] = items[i + 1]
            elif name in ("APPEND", "APPENDS"):
                items = [pop()] if name == "APPEND" else pop_mark()
                if not stack or not isinstance(stack[-1], list):
                    raise refuse(f"{name} on something that is not a list")
                stack[-1].extend(items)
            elif name == "GLOBAL":
                module, _, gname = str(arg).partition(" ")
                stack.append(make_global(module, gname))
            elif name == "STACK_GLOBAL":
                gname, module = pop(), pop()
                if not isinstance(module, str) or not isinstance(gname, str):
                    raise refuse("STACK_GLOBAL of something that is not two strings")
                stack.append(make_global(module, gname))
            elif name == "REDUCE":
                args, fn = pop(), pop()
                key = (fn.module, fn.name) if isinstance(fn, Global) else None
                ok_args = isinstance(args, tuple) and (args == () or (len(args) == 1 and (
                    args[0] is None or (isinstance(args[0], Global) and (args[0].module, args[0].name) in values))))
                if key not in containers or not ok_args:
                    what = f"{fn.module}.{fn.name}" if isinstance(fn, Global) else type(fn).__name__
                    raise refuse(f"a call of {what} (REDUCE) is not allowed")
                stack.append({})
            elif name == "NEWOBJ":
                args, cls = pop(), pop()
                if not isinstance(cls, Global) or (cls.module, cls.name) not in objects or args != ():
                    what = f"{cls.module}.{cls.name}" if isinstance(cls, Global) else type(cls).__name__
                    raise refuse(f"creating an instance of {what} (NEWOBJ) is not allowed")
                stack.append(PickledObject(cls.module, cls.name))
            elif name == "BUILD":
                state = pop()
                target = stack[-1] if stack else None
                if not isinstance(target, PickledObject) or not isinstance(state, dict) or target.state:
                    raise refuse("BUILD of something other than an allowed object with a dict state")
                target.state = state
            else:
                raise refuse(f"opcode {name} at byte {pos} is not allowed")
    except DataError:
        raise
    except (ValueError, IndexError, TypeError, EOFError) as e:  # a truncated or malformed opcode stream
        raise refuse(f"malformed ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None
    raise refuse("no STOP opcode")
