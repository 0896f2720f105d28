import faulthandler, sys, time
faulthandler.dump_traceback_later(90, exit=True)
from chat.engine import Engine, Sampling, collect
from chat.engine_process import EngineProcess
m = sys.argv[1]
t = time.time(); e = Engine(m); e.load(); print("in-process load", round(time.time() - t, 1), flush=True)
print(collect(e.generate([{"role": "user", "content": "hi"}], "base", Sampling(0, 1, 16)))[1], flush=True)
t = time.time(); p = EngineProcess(m); p.load(); print("process load", round(time.time() - t, 1), flush=True)
print(collect(p.generate([{"role": "user", "content": "hi"}], "base", Sampling(0, 1, 16)))[1], flush=True)
p.close(); print("ok")
