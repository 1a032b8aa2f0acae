"""What runs inside a sandbox run: the launcher (isolation), the program's process, and the judge.

`gainrl_pl.rewards.sandbox` runs this file once per program run in a fresh `python -I -S` (its code compiled once in the
training process and sent on stdin ahead of the job, or its text with `-c` for another interpreter; the job
follows in two parts, see `main`), so it imports only built-in or small stdlib modules: every import here is
paid on every run. The training process never imports it (tests do, to check the wire format directly).

Process tree of one run (see docs/sandbox.md, "Verdicts"):

    training process -> launcher (this file; its own session / process group)
                          -> program: limits set, privileges dropped; runs setup + program, then answers
                          |           the judge's requests ("call add(1, 2)") with plain data
                          -> judge:   limits set, privileges dropped (another uid); runs the tests and
                                      decides and reports every verdict; never runs program code

The verdict is decided where the program's code never runs. The judge holds the test code, the result
descriptor and the run's key (each result line carries a keyed hash); the program's process is forked before
the launcher reads the tests and the key, and closes the result descriptor.
Values cross from the program to the judge as JSON read by the C scanner into builtin types only (numbers,
strings, bytes, None, bool, and lists / tuples / dicts / sets of those). Anything else stays in the program's
process as a handle: the judge can pass it back, call it, read its attributes, items, length, truth and str,
and iterate it, but never lets it compare itself: a handle is equal only to itself.

In `namespaces` mode (root only) the launcher first moves into new mount, network, PID, IPC and UTS
namespaces and makes every mount read-only except the scratch directory; the program's process is PID 1 of
the new PID namespace, so when it exits the kernel kills everything it left behind (and the judge).
"""

import _blake2
import _json
import builtins
import ctypes
import marshal
import os
import resource
import signal
import sys

# Linux constants (include/uapi/linux/sched.h, mount.h, prctl.h): Python 3.11 has no os.unshare / mount.
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
# Per-mount options in /proc/self/mountinfo that a read-only remount must repeat, or it would clear them.
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                      "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
# Pseudo file systems: a failed read-only remount below these is tolerated (their files are root-owned and
# the program runs as an unprivileged uid without capabilities); anywhere else it aborts namespaces mode.
TOLERATED_MOUNT_PREFIXES = ("/proc", "/sys")

_libc = None


def _call_libc(name, *args):
    """Call a libc function that returns 0 on success; raise OSError with errno otherwise."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        _libc.unshare.argtypes = [ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args[:2]}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()

    _call_libc("mount", enc(source), enc(target), enc(fstype), flags, enc(data))


def _unescape_mount_path(path):
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return path.encode().decode("unicode_escape").encode("latin-1").decode() if "\\" in path else path


# ----------------------------------------------------------------------------------------- namespaces
def _first_blocker(path):
    """(directory, child) where `path` stops being reachable for other users (no o+x), or None."""
    parts = [p for p in path.split("/") if p]
    current = "/"
    for name in parts:
        try:
            if not os.stat(current).st_mode & 0o001:
                return current, name
        except OSError:
            return None
        current = os.path.join(current, name)
    return None


def _open_up(paths):
    """Make `paths` reachable for the unprivileged sandbox uid inside this mount namespace.

    The interpreter's stdlib may live under a directory others cannot enter (pyenv under /root, mode
    0700). Changing its mode would change the host; instead, a tmpfs is mounted over the blocking
    directory and only the needed children are bind-mounted back into it, which also hides the rest of
    that directory (e.g. the rest of /root) from the program.
    """
    for _ in range(8):  # each round opens one level; deeper blockers are found in the next round
        blocked = {}
        for path in paths:
            hit = _first_blocker(path)
            if hit:
                blocked.setdefault(hit[0], set()).add(hit[1])
        if not blocked:
            return
        for directory, children in blocked.items():
            # O_PATH handles keep the children reachable after the tmpfs hides them.
            handles = {c: os.open(os.path.join(directory, c), os.O_PATH) for c in children}
            kinds = {c: os.path.isdir(os.path.join(directory, c)) for c in children}
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            for child, fd in handles.items():
                target = os.path.join(directory, child)
                if kinds[child]:
                    os.mkdir(target)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
                os.close(fd)
    raise OSError("could not make the interpreter's paths reachable: " + ", ".join(paths))


def _remount_all_readonly():
    """Remount every mount of this (private) mount namespace read-only and nosuid."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()
        target, options = _unescape_mount_path(fields[4]), fields[5].split(",")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for option in options:
            flags |= MOUNT_OPTION_FLAGS.get(option, 0)
        try:
            _mount(None, target, None, flags)
        except OSError:
            if not target.startswith(TOLERATED_MOUNT_PREFIXES):
                raise


def enter_namespaces(workdir, uid, scratch_mb):
    """Unshare mount/net/PID/IPC/UTS namespaces; leave only `workdir` writable. Needs root (CAP_SYS_ADMIN).

    `workdir` becomes a private tmpfs of `scratch_mb` MiB owned by `uid`: the program cannot fill the
    host's disk, and its files vanish with the namespace. The next fork becomes PID 1 of the new PID
    namespace. The new network namespace has only a loopback interface, which is down: no connection to
    anything, the host's localhost included.
    """
    _call_libc("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
    # First, before any other mount call: nothing done below may propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _open_up([p for p in sys.path if os.path.exists(p)] + [workdir])
    _remount_all_readonly()
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={scratch_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")


# ----------------------------------------------------------------------------------------- process setup
def _block_sockets():
    """Python-level socket guard for `rlimits` mode (no network namespace): socket creation raises.

    Best effort only: ctypes or a subprocess can still reach the C library directly.
    """
    import _socket
    import socket

    class NoNetworkSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError(1, "network access is disabled in the sandbox")

    def refuse(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the sandbox")

    _socket.socket = _socket.SocketType = socket.socket = socket.SocketType = NoNetworkSocket
    socket.socketpair = socket.fromfd = socket.create_connection = socket.create_server = refuse


def _set_limits(limits):
    mib = 1024 * 1024
    pairs = [
        (resource.RLIMIT_AS, limits["memory_mb"] * mib),
        (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mib),
        (resource.RLIMIT_NOFILE, limits["max_open_files"]),
        (resource.RLIMIT_NPROC, limits["max_processes"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in pairs:
        resource.setrlimit(which, (value, value))
    # The soft CPU limit sends SIGXCPU (kills: no handler yet), the hard one a second later SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))


def _drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # an unprivileged uid: all capabilities are gone from here on


def _harden(parent_death=True):
    """no_new_privs, and die with the launcher; set after a uid change (which clears the death signal)."""
    if sys.platform.startswith("linux"):  # elsewhere (rlimits mode only) the process-group kill remains
        _call_libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if parent_death:
            _call_libc("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _make_undumpable():
    """Refuse ptrace and /proc/<pid>/{mem,fd,environ} to processes without CAP_SYS_PTRACE, even of the same uid
    (rlimits mode): the program must not read the judge's memory or reach its result descriptor."""
    if sys.platform.startswith("linux"):
        _call_libc("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)


def _lower_oom_priority():
    try:  # the OOM killer should pick a sandbox before the training process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _close_fds_except(keep):
    """Close every descriptor >= 3 except `keep`."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 16)


def _stdin_from_devnull():
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _describe(err):
    try:
        text = f"{type(err).__name__}: {err}"
    except BaseException:  # noqa: B036 (a program's exception may fail to print itself)
        text = type(err).__name__
    return " ".join(text.split())[:300]


def _no_huge_int_limit():
    if hasattr(sys, "set_int_max_str_digits"):  # exact ints of any size cross (3.11+ caps str(int) at 4300 digits)
        sys.set_int_max_str_digits(0)


# ----------------------------------------------------------------------------------------- wire format
# Frames: 8 hex digits of length, then the payload. Judge -> program payloads are marshal (the judge is trusted;
# marshal keeps tuples, lists, sets, dicts and bytes apart, and is fast for big test inputs). Program -> judge
# payloads are JSON text, read by the C scanner of `_json` into builtin types only; what JSON lacks is a tagged
# object: {"t": [...]} tuple, {"s": [...]} set, {"f": [...]} frozenset, {"d": [[k, v], ...]} dict,
# {"b": hex} bytes, {"y": hex} bytearray, {"c": [re, im]} complex, {"h": n} handle n.
MAX_FRAME_BYTES = 1 << 30
MAX_DEPTH = 200
MAX_ITEMS = 1_000_000  # items of one program iterable the judge iterates over
SCALAR_TYPES = frozenset({type(None), bool, int, float, str})
MUTABLE_TYPES = (list, dict, set, bytearray)
REF = StopIteration  # first item of a (REF, kind, key) reference in judge -> program data (classes never are data)
_INF = float("inf")
_c_encode_scalars = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",", False, False, True)


class Channel:
    """Length-prefixed frames over a pair of pipe descriptors."""

    def __init__(self, read_fd, write_fd):
        self.read_fd, self.write_fd = read_fd, write_fd
        self._buffer = bytearray()

    def send(self, payload):
        data = b"%08x" % len(payload) + payload if len(payload) < 65536 else None
        if data is None:
            self._write_all(b"%08x" % len(payload))
            data = payload
        self._write_all(data)

    def _write_all(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def receive(self):
        """The next payload; None at the end of the stream. Raises ValueError on a malformed frame."""
        if not self._fill(8):
            if self._buffer:
                raise ValueError("the stream ended inside a frame header")
            return None
        header = bytes(self._buffer[:8])
        if not all(c in b"0123456789abcdef" for c in header):
            raise ValueError(f"malformed frame header {header!r}")
        size = int(header, 16)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"a frame of {size} bytes is over the limit")
        if not self._fill(8 + size):
            raise ValueError("the stream ended inside a frame")
        payload = bytes(self._buffer[8:8 + size])
        del self._buffer[:8 + size]
        return payload

    def _fill(self, size):
        while len(self._buffer) < size:
            chunk = os.read(self.read_fd, max(65536, size - len(self._buffer)))
            if not chunk:
                return False
            self._buffer += chunk
        return True


def _float_json(x):
    if x != x:
        return "NaN"
    if x == _INF or x == -_INF:
        return "Infinity" if x > 0 else "-Infinity"
    return float.__repr__(x)


# Subclasses of builtin types (IntEnum, namedtuple, OrderedDict, Counter, numpy.float64) cross as the builtin
# value they hold: a subclass's own methods (its __eq__ included) stay behind.
_AS_BUILTIN = ((int, int.__int__), (float, float.__float__), (str, str.__str__), (bytes, bytes),
               (bytearray, bytearray), (complex, lambda z: complex(z.real, z.imag)), (tuple, tuple), (list, list),
               (dict, dict), (set, set), (frozenset, frozenset))


class ProgramEncoder:
    """Program side: a value as JSON text of builtin data; any other object becomes a handle (kept here)."""

    def __init__(self):
        self.handles = {}
        self._handle_ids = {}

    def handle(self, obj):
        hid = self._handle_ids.get(id(obj))
        if hid is None:
            hid = len(self.handles) + 1
            self.handles[hid] = obj  # kept alive, so id(obj) stays unique
            self._handle_ids[id(obj)] = hid
        return hid

    def encode(self, value, depth=0, handles=True):
        kind = type(value)
        if kind is str:
            return _json.encode_basestring_ascii(value)
        if kind is int:
            return int.__repr__(value)
        if kind is float:
            return _float_json(value)
        if value is None:
            return "null"
        if kind is bool:
            return "true" if value else "false"
        if depth > MAX_DEPTH:
            raise ValueError(f"the value is nested more than {MAX_DEPTH} levels deep")
        if kind is list:
            return self._sequence(value, depth, handles)
        if kind is tuple:
            return '{"t":' + self._sequence(value, depth, handles) + "}"
        if kind is set or kind is frozenset:
            return ('{"s":' if kind is set else '{"f":') + self._sequence(list(value), depth, handles) + "}"
        if kind is dict:
            items = [f"[{self.encode(k, depth + 1, handles)},{self.encode(v, depth + 1, handles)}]"
                     for k, v in value.items()]
            return '{"d":[' + ",".join(items) + "]}"
        if kind is bytes or kind is bytearray:
            return ('{"b":"' if kind is bytes else '{"y":"') + value.hex() + '"}'
        if kind is complex:
            return '{"c":[' + _float_json(value.real) + "," + _float_json(value.imag) + "]}"
        for base, convert in _AS_BUILTIN:
            if isinstance(value, base):
                return self.encode(convert(value), depth + 1, handles)
        if not handles:
            raise TypeError(f"{kind.__name__} is not plain data")
        return '{"h":' + str(self.handle(value)) + "}"

    def _sequence(self, items, depth, handles):
        if set(map(type, items)) <= SCALAR_TYPES:  # the common case (lists of numbers or strings), at C speed
            return "".join(_c_encode_scalars(items, 0))
        return "[" + ",".join([self.encode(v, depth + 1, handles) for v in items]) + "]"


class _ScanContext:
    """What `_json.make_scanner` reads its settings from (the same attributes as json.JSONDecoder)."""

    strict = True
    object_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": _INF, "-Infinity": -_INF}.__getitem__

    def __init__(self, object_pairs_hook):
        self.object_pairs_hook = object_pairs_hook
        self.memo = {}


def make_decoder(make_handle):
    """Judge side: JSON text from the program -> builtin data, handles made by `make_handle(n)`.

    Strict: a JSON object must be exactly one known tag with a body of the right type, or the whole reply is
    refused (ValueError/TypeError); nothing but builtin containers, scalars and handles can come out.
    """

    def tagged(pairs):
        if len(pairs) != 1:
            raise ValueError("malformed object in the program's reply")
        tag, body = pairs[0]
        kind = type(body)
        if kind is list:
            if tag == "t":
                return tuple(body)
            if tag == "s":
                return set(body)
            if tag == "f":
                return frozenset(body)
            if tag == "d":
                out = {}
                for item in body:
                    if type(item) is not list or len(item) != 2:
                        raise ValueError("malformed dict in the program's reply")
                    out[item[0]] = item[1]
                return out
            if tag == "c" and len(body) == 2 and all(type(x) in (int, float) for x in body):
                return complex(body[0], body[1])
        elif kind is str and tag in ("b", "y"):
            return bytes.fromhex(body) if tag == "b" else bytearray.fromhex(body)
        elif kind is int and tag == "h" and body > 0:
            return make_handle(body)
        raise ValueError(f"unknown object {tag!r} in the program's reply")

    scan = _json.make_scanner(_ScanContext(tagged))

    def decode(payload):
        text = payload.decode("utf-8")
        try:
            value, end = scan(text, 0)
        except StopIteration:
            raise ValueError("the program's reply is not JSON") from None
        if end != len(text):
            raise ValueError("trailing data after the program's reply")
        return value

    return decode


def pack(value):
    """Judge side: marshal bytes of test data for the program, and whether it holds references to handles."""
    try:
        return marshal.dumps(value, 2), False
    except ValueError:  # a handle, a subclass of a builtin type, or something that cannot be sent (says which)
        return marshal.dumps(_with_references(value, 0), 2), True


def _with_references(value, depth):
    kind = type(value)
    if kind in SCALAR_TYPES or kind is bytes or kind is complex or value is Ellipsis:
        return value
    if kind is Remote:
        return (REF, *value._ref)
    if depth > MAX_DEPTH:
        raise ValueError(f"the value is nested more than {MAX_DEPTH} levels deep")
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return kind(_with_references(v, depth + 1) for v in value)
    if kind is dict:
        return {_with_references(k, depth + 1): _with_references(v, depth + 1) for k, v in value.items()}
    if kind is bytearray:
        return value
    for base, convert in _AS_BUILTIN:
        if isinstance(value, base):
            return _with_references(convert(value), depth + 1)
    raise TypeError(f"a {kind.__name__} cannot be passed to the program: only plain data (numbers, strings, bytes, "
                    "None, bool, lists, tuples, dicts, sets) and objects the program returned can cross")


def _resolve_references(value, resolve, depth=0):
    kind = type(value)
    if kind is tuple:
        if len(value) == 3 and value[0] is REF:
            return resolve(value[1], value[2])
        return tuple(_resolve_references(v, resolve, depth + 1) for v in value)
    if kind is list or kind is set or kind is frozenset:
        return kind(_resolve_references(v, resolve, depth + 1) for v in value)
    if kind is dict:
        return {_resolve_references(k, resolve, depth + 1): _resolve_references(v, resolve, depth + 1)
                for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------- program side
class ProgramServer:
    """Runs in the program's process: loads the program, then answers the judge's requests until it hangs up.

    Nothing here is trusted: the program can replace any of it. What it sends is only ever read as data.
    """

    def __init__(self, channel):
        self.channel = channel
        self.encoder = ProgramEncoder()
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}

    def load(self, setup, program):
        """Run setup + program as `__main__` (its `if __name__ == "__main__":` block runs, stdin empty)."""
        try:
            if setup:
                exec(compile(setup, "<setup>", "exec", dont_inherit=True), self.namespace)
            exec(compile(program, "<program>", "exec", dont_inherit=True), self.namespace)
        except BaseException as err:  # noqa: B036 (SystemExit too: the program did not finish defining itself)
            self.channel.send(('["failed",' + _json.encode_basestring_ascii(_describe(err)) + "]").encode())
            return False
        self.channel.send(b'["loaded"]')
        return True

    def serve(self):
        while True:
            frame = self.channel.receive()
            if frame is None:
                return
            try:
                reply = self.answer(*marshal.loads(frame))
            except BaseException as err:  # noqa: B036 (what a call raises is the answer)
                reply = self.error_reply(err)
            self.channel.send(reply.encode("ascii"))

    def error_reply(self, err):
        try:
            names = [c.__name__ for c in type(err).__mro__ if isinstance(c.__name__, str)]
            message = str(err) if err.args else ""
            if type(message) is not str:
                message = ""
            return '["err",' + self.encoder.encode(names) + "," + _json.encode_basestring_ascii(message[:1000]) + "]"
        except BaseException:  # noqa: B036
            return '["err",["Exception"],""]'

    def resolve(self, kind, key):
        if kind == "h":
            return self.encoder.handles[key]
        try:
            return self.namespace[key]
        except KeyError:
            raise NameError(f"name {key!r} is not defined") from None

    def answer(self, op, ref, blob, has_references):
        data = marshal.loads(blob)
        if has_references:
            data = _resolve_references(data, self.resolve)
        if op == "resolve":
            return self.describe_names(data)
        target = self.resolve(*ref)
        if op == "call":
            args, kwargs = data
            result = target(*args, **kwargs)
            changed = self.changed_arguments(args, kwargs, blob) if not has_references else None
            if changed:
                return '["ok",' + self.encoder.encode(result) + "," + self.encoder.encode(changed) + "]"
            return '["ok",' + self.encoder.encode(result) + "]"
        if op == "attr":
            result = getattr(target, data)
        elif op == "item":
            result = target[data]
        elif op == "len":
            result = len(target)
        elif op == "bool":
            result = bool(target)
        elif op == "str":
            result = str(target)
        elif op == "iter":
            result = []
            for item in target:
                if len(result) == MAX_ITEMS:
                    raise ValueError(f"more than {MAX_ITEMS} items")
                result.append(item)
        else:
            raise ValueError(f"unknown request {op!r}")
        return '["ok",' + self.encoder.encode(result) + "]"

    @staticmethod
    def changed_arguments(args, kwargs, blob):
        """[[position or name, new value], ...] of the list/dict/set/bytearray arguments, if any changed in place."""
        mutable = [(i, a) for i, a in enumerate(args) if type(a) in MUTABLE_TYPES]
        mutable += [(k, v) for k, v in kwargs.items() if type(v) in MUTABLE_TYPES]
        if not mutable:
            return None
        try:
            if marshal.dumps((args, kwargs), 2) == blob:
                return None
        except ValueError:
            pass
        return [list(item) for item in mutable]

    def describe_names(self, names):
        """[[name, kind, payload], ...] for the global names the tests use: "v" a plain value (its data),
        "m" a module (its name), "r" anything else (the judge calls or asks it by name)."""
        module_type = type(sys)
        parts = []
        for name in names:
            if name not in self.namespace:
                continue
            value = self.namespace[name]
            key = _json.encode_basestring_ascii(name)
            if isinstance(value, module_type):
                parts.append(f'[{key},"m",{_json.encode_basestring_ascii(str(value.__name__))}]')
                continue
            if not callable(value):
                try:
                    parts.append(f'[{key},"v",{self.encoder.encode(value, handles=False)}]')
                    continue
                except (TypeError, ValueError, RecursionError):
                    pass
            parts.append(f'[{key},"r"]')
        return '["ok",[' + ",".join(parts) + "]]"


# ----------------------------------------------------------------------------------------- judge side
# Exceptions a program's call may raise in the tests: the builtin class it derives from. StopIteration would end
# a `map`/`filter`/`iter` the test iterates over (`all(map(f, cases))` true with nothing checked), so it, and
# anything without a builtin Exception base, becomes RuntimeError.
_CROSSING_EXCEPTIONS = {name: cls for name, cls in vars(builtins).items()
                        if isinstance(cls, type) and issubclass(cls, Exception)
                        and not issubclass(cls, (StopIteration, StopAsyncIteration))}


class ProgramError(RuntimeError):
    """The program's process ended, or broke the protocol: every later request fails with this too."""


class Remote:
    """Judge side: an object that lives in the program's process (a function, a class, an instance of one).

    It can be called, passed back, and asked for attributes, items, len, bool, str and iteration (each answer
    is plain data or another Remote). Comparisons are identity only: a program cannot make one equal to
    anything, whatever its `__eq__` says.
    """

    __slots__ = ("_ref", "_label")
    _judge = None  # the Judge of this process

    def __init__(self, ref, label):
        self._ref, self._label = ref, label

    def __call__(self, *args, **kwargs):
        return Remote._judge.call(self._ref, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name not in ("__name__", "__qualname__", "__doc__", "__module__"):
            raise AttributeError(name)
        return Remote._judge.request("attr", self._ref, name)

    def __getitem__(self, key):
        return Remote._judge.request("item", self._ref, key)

    def __len__(self):
        return _checked(Remote._judge.request("len", self._ref), int, "__len__")

    def __bool__(self):
        return _checked(Remote._judge.request("bool", self._ref), bool, "__bool__")

    def __str__(self):
        return _checked(Remote._judge.request("str", self._ref), str, "__str__")

    def __iter__(self):
        return iter(_checked(Remote._judge.request("iter", self._ref), list, "__iter__"))

    def __repr__(self):
        return f"<program object {self._label}>"


def _checked(value, kind, what):
    if type(value) is not kind or (kind is int and value < 0):
        raise TypeError(f"{what} of a program object returned {type(value).__name__}")
    return value


def _program_exception(names, message):
    if type(names) is not list or type(message) is not str:
        return ProgramError("malformed error reply from the program")
    for name in names:
        cls = _CROSSING_EXCEPTIONS.get(name) if type(name) is str else None
        if cls is not None:
            try:
                return cls(message)
            except Exception:  # e.g. UnicodeDecodeError needs five arguments: try the next base
                continue
    return RuntimeError(f"{names[0] if names and type(names[0]) is str else 'exception'}: {message}")


class Judge:
    """Sends requests to the program's process and reads its replies as plain data."""

    def __init__(self, channel):
        self.channel = channel
        self.broken = None
        self._handles = {}
        self.decode = make_decoder(self._handle)
        Remote._judge = self

    def _handle(self, hid):
        remote = self._handles.get(hid)
        if remote is None:
            remote = self._handles[hid] = Remote(("h", hid), f"#{hid}")
        return remote

    def _fail(self, reason):
        self.broken = reason
        raise ProgramError(reason)

    def receive(self):
        try:
            frame = self.channel.receive()
        except (OSError, ValueError) as err:
            self._fail(f"the program broke the protocol: {err}")
        if frame is None:
            self._fail("the program's process ended")
        try:
            reply = self.decode(frame)
        except Exception as err:  # noqa: BLE001 (whatever the scanner raises: the reply is refused)
            self._fail(f"the program sent a malformed reply ({type(err).__name__})")
        if type(reply) is not list or not reply or type(reply[0]) is not str:
            self._fail("the program sent a malformed reply")
        return reply

    def wait_loaded(self):
        """None once the program's top level ran; else why it did not."""
        try:
            reply = self.receive()
        except ProgramError as err:
            return str(err).replace("the program's process ended", "the program ended before its tests ran")
        if reply == ["loaded"]:
            return None
        if reply[0] == "failed" and len(reply) == 2 and type(reply[1]) is str:
            return reply[1] or "the program failed to load"
        return "the program sent a malformed reply"

    def request(self, op, ref, data=None):
        return self._exchange(op, ref, data)[1]

    def call(self, ref, args, kwargs):
        reply = self._exchange("call", ref, (args, kwargs))
        if len(reply) == 3:
            _apply_changes(reply[2], args, kwargs)
        return reply[1]

    def _exchange(self, op, ref, data):
        if self.broken:
            raise ProgramError(self.broken)
        blob, has_references = pack(data)
        try:
            self.channel.send(marshal.dumps((op, ref, blob, has_references), 2))
        except OSError as err:
            self._fail(f"the program's process ended ({err.strerror})")
        reply = self.receive()
        if reply[0] == "ok" and len(reply) in (2, 3):
            return reply
        if reply[0] == "err" and len(reply) == 3:
            raise _program_exception(reply[1], reply[2])
        self._fail("the program sent a malformed reply")

    def resolve(self, names, namespace):
        """Bind the tests' free names that the program defines: plain values as data, modules by importing the
        same module here, everything else as a Remote called by name."""
        wanted = set(names)
        reply = self.request("resolve", None, list(names))
        if type(reply) is not list:
            self._fail("the program sent a malformed reply")
        for item in reply:
            if type(item) is not list or len(item) not in (2, 3) or item[0] not in wanted:
                continue
            name, kind = item[0], item[1]
            if kind == "v" and len(item) == 3:
                namespace[name] = item[2]
            elif kind == "m" and len(item) == 3 and item[2] == name:
                try:  # the real module, imported here: a program's patched copy stays behind
                    namespace[name] = __import__(name)
                except Exception:  # noqa: BLE001 (not importable here: reach the program's copy instead)
                    namespace[name] = Remote(("g", name), name)
            else:
                namespace[name] = Remote(("g", name), name)


def _apply_changes(changes, args, kwargs):
    """Copy the program's in-place changes of list/dict/set/bytearray arguments back into the test's objects."""
    if type(changes) is not list:
        return
    for change in changes:
        if type(change) is not list or len(change) != 2:
            continue
        where, new = change
        if type(where) is int and 0 <= where < len(args):
            old = args[where]
        elif type(where) is str and where in kwargs:
            old = kwargs[where]
        else:
            continue
        if type(old) is list and type(new) is list or type(old) is bytearray and type(new) in (bytes, bytearray):
            old[:] = new
        elif type(old) is dict and type(new) is dict or type(old) is set and type(new) is set:
            old.clear()
            old.update(new)


def run_judge(judge, setup, steps, names, report):
    """Run setup code and the test steps here, against the program in its own process; report each verdict.

    Reports `L` once the program's top level ran, then `P i` / `F i` for each counted step i (as it
    finishes, so a later step that hangs still leaves the earlier results), and `D` at the end. A program
    that fails to load reports `E <error>` and no step runs.
    """
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    setup_error = None
    try:  # while the program loads
        if setup:
            exec(compile(setup, "<setup>", "exec", dont_inherit=True), namespace)
        compiled = [(compile(source, f"<test {i}>", "exec", dont_inherit=True), counted)
                    for i, (source, counted) in enumerate(steps)]
    except BaseException as err:  # noqa: B036
        setup_error, compiled = err, []
    load_error = judge.wait_loaded()
    if load_error is not None:
        report("E", " ".join(load_error.split())[:300])
        return
    if setup_error is not None:
        report("E", "the tests or setup code failed: " + _describe(setup_error))
        return
    report("L")
    unbound = [n for n in names if n not in namespace]
    if unbound:
        try:
            judge.resolve(unbound, namespace)
        except BaseException:  # noqa: B036 (the names stay unbound: the tests that use them fail)
            pass
    for index, (code, counted) in enumerate(compiled):
        try:
            exec(code, namespace)
            ok = True
        except BaseException as err:  # noqa: B036
            ok = False
            if counted:
                report("T", f"{index} {_describe(err)}")
        if counted:
            report("P" if ok else "F", str(index))
    report("D")


# ----------------------------------------------------------------------------------------- process tree
def _read_exactly(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise ValueError("incomplete job")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_part(fd):
    """One length-prefixed part of the job from `fd`, read exactly (the next part must stay in the pipe)."""
    return marshal.loads(_read_exactly(fd, int(_read_exactly(fd, 8), 16)))


def _program_process(job, isolation, read_fd, write_fd):
    """The forked program process: limits, privilege drop, then the program and its server. Never returns."""
    code = 0
    channel = Channel(read_fd, write_fd)
    try:
        if isolation == "namespaces":
            # A /proc for the new PID namespace (this process is its PID 1): the program sees only the run.
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        _lower_oom_priority()
        _stdin_from_devnull()
        _close_fds_except({read_fd, write_fd})  # the result file, the launcher's pipes: none stays reachable
        _set_limits(job["limits"])
        if isolation == "namespaces":
            _drop_privileges(job["uid"])
        else:
            _block_sockets()
        _harden()
        os.chdir(job["workdir"])
        os.umask(0o077)
        _no_huge_int_limit()
    except BaseException as err:  # noqa: B036 (a setup failure must end the process, never fall through)
        try:
            message = "sandbox setup failed: " + _describe(err)
            channel.send(('["failed",' + _json.encode_basestring_ascii(message) + "]").encode())
            _wait_for_hangup(channel)
        except BaseException:  # noqa: B036
            pass
        os._exit(3)
    server = ProgramServer(channel)
    server.load(job["setup"], job["program"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: B036 (the program may have closed or replaced them, or hit RLIMIT_FSIZE)
            pass
    try:
        # Also after a failed load: in namespaces mode this process is PID 1, and its exit would kill the
        # judge before it reported why.
        server.serve()
    except BaseException:  # noqa: B036 (the program may have closed or replaced anything)
        code = 1
    os._exit(code)  # skips atexit handlers and non-daemon threads the program may have left


def _wait_for_hangup(channel):
    while channel.receive() is not None:
        pass


def _judge_process(job, tests, isolation, read_fd, write_fd, result_fd):
    """The forked judge: limits, its own uid, then the tests. Never returns."""
    key = tests["key"]

    def report(tag, text=""):
        _write_result(result_fd, key, tag, text)

    code = 0
    try:
        _lower_oom_priority()
        _stdin_from_devnull()
        _close_fds_except({read_fd, write_fd, result_fd})
        _set_limits(job["limits"])
        if isolation == "namespaces":
            _drop_privileges(job["judge_uid"])  # not the program's uid: it cannot signal or trace the judge
        _harden()
        _make_undumpable()  # after the uid change, which resets it
        os.chdir("/")
        _no_huge_int_limit()
        judge = Judge(Channel(read_fd, write_fd))
    except BaseException as err:  # noqa: B036
        report("X", f"judge setup failed: {_describe(err)}")
        os._exit(3)
    try:
        run_judge(judge, job["setup"], tests["steps"], tests["names"], report)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as err:  # noqa: B036 (e.g. MemoryError from the tests themselves)
        try:
            report("X", f"the judge failed: {_describe(err)}")
        except BaseException:  # noqa: B036
            pass
        code = 3
    os._exit(code)


def _write_result(fd, key, tag, text=""):
    """One result line: "<keyed BLAKE2b of the rest> <tag> <text>". The key never leaves the launcher, the judge
    and the training process, so a line is authentic even where a program can read or append to the file."""
    body = " ".join(f"{tag} {text}".split()).encode("utf-8", "replace")
    mac = _blake2.blake2b(body, key=key, digest_size=16).hexdigest().encode()
    os.write(fd, mac + b" " + body + b"\n")


def _status_text(status):
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {status}"


def main():
    """Launcher entry point: isolate, fork the program, only then read the tests and fork the judge.

    The job comes on stdin in two parts. The first (program, setup, limits) is all the program's process
    inherits; the second (tests, the key) is read after that fork, so it never lies in the program's memory.
    """
    _make_undumpable()  # inherited by both children; the program cannot read this process either
    job = _read_part(0)
    result_fd = os.open(job["result_path"], os.O_WRONLY | os.O_APPEND)
    isolation, note = "rlimits", ""
    if job["isolation"] == "namespaces" or (job["isolation"] == "auto" and os.geteuid() == 0):
        try:
            enter_namespaces(job["workdir"], job["uid"], job["limits"]["scratch_mb"])
            isolation = "namespaces"
        except OSError as err:
            note = _describe(err)
            if job["isolation"] == "namespaces":
                tests = _read_part(0)
                _write_result(result_fd, tests["key"], "X", f"namespaces unavailable: {note}")
                os._exit(3)
    to_program, from_program = os.pipe(), os.pipe()
    program_pid = os.fork()
    if program_pid == 0:
        os.close(to_program[1])
        os.close(from_program[0])
        _program_process(job, isolation, to_program[0], from_program[1])
    os.close(to_program[0])
    os.close(from_program[1])
    tests = _read_part(0)
    key = tests["key"]
    _write_result(result_fd, key, "I", f"{isolation} {note}")
    try:
        judge_pid = os.fork()
    except OSError:  # namespaces mode: the program (PID 1 there) already ended, and the namespace with it
        _, status = os.waitpid(program_pid, 0)
        _write_result(result_fd, key, "E", f"the program ended before its tests ran ({_status_text(status)})")
        os._exit(0)
    if judge_pid == 0:
        _judge_process(job, tests, isolation, from_program[0], to_program[1], result_fd)
    os.close(from_program[0])
    os.close(to_program[1])
    _, status = os.waitpid(judge_pid, 0)
    if not os.WIFEXITED(status):  # e.g. killed when the program, PID 1 of the namespace, ended
        ended, program_status = os.waitpid(program_pid, os.WNOHANG)
        why = f"the program's process ended before the judge finished ({_status_text(program_status)})" if ended else \
            f"the judge was {_status_text(status)}"
        _write_result(result_fd, key, "E", why)
    try:
        os.kill(program_pid, signal.SIGKILL)
        # In namespaces mode the program is PID 1: once it is reaped, everything it left behind is gone.
        os.waitpid(program_pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    os._exit(min(255, max(0, os.waitstatus_to_exitcode(status))) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
