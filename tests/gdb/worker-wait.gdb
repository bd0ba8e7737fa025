# gdb -batch -p PID -x tests/gdb/worker-wait.gdb
# For a worker stuck in the library: its backtrace, then the lease and slot
# of the wait it is stuck in (the innermost frame that has a lease `l`).
bt
python
import gdb
f = gdb.newest_frame()
while f is not None:
    try:
        f.read_var("l")
    except Exception:
        f = f.older()
        continue
    f.select()
    gdb.execute("print/x *l")
    gdb.execute("print/x *l->s")
    break
end
