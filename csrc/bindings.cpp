// dp360rt._C: the request scheduler (planner, step loop, view queue). CPU only: no torch or CUDA
// dependency; tensors stay on the Python side.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scheduler.hpp"

#ifndef DP360RT_VERSION
#define DP360RT_VERSION "0.1.0"
#endif

namespace py = pybind11;
using namespace dp360rt;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dp360rt native scheduler (CPU only; no torch/CUDA dependency).";
  m.def("version", [] { return std::string(DP360RT_VERSION); }, "Version of the native extension.");

  py::class_<TaskInfo>(m, "TaskInfo", "A sampling task as the planner sees it.")
      .def(py::init([](int64_t id, int64_t request, int window, int model, int rows, int steps_done,
                       int steps_total, int64_t bytes_per_row, bool ready) {
             return TaskInfo{id, request, window, model, rows, steps_done, steps_total, bytes_per_row, ready};
           }),
           py::arg("id"), py::arg("request"), py::arg("window"), py::arg("model") = 0, py::arg("rows") = 1,
           py::arg("steps_done") = 0, py::arg("steps_total") = 1, py::arg("bytes_per_row") = 0,
           py::arg("ready") = true)
      .def_readwrite("id", &TaskInfo::id)
      .def_readwrite("request", &TaskInfo::request)
      .def_readwrite("window", &TaskInfo::window)
      .def_readwrite("model", &TaskInfo::model)
      .def_readwrite("rows", &TaskInfo::rows)
      .def_readwrite("steps_done", &TaskInfo::steps_done)
      .def_readwrite("steps_total", &TaskInfo::steps_total)
      .def_readwrite("bytes_per_row", &TaskInfo::bytes_per_row)
      .def_readwrite("ready", &TaskInfo::ready);

  m.def("plan_batch",
        [](const std::vector<TaskInfo>& tasks, const std::string& policy, int max_rows, int64_t budget_bytes,
           int64_t fixed_bytes) { return plan_batch(tasks, parse_policy(policy), max_rows, budget_bytes, fixed_bytes); },
        py::arg("tasks"), py::arg("policy"), py::arg("max_rows"), py::arg("budget_bytes") = 0,
        py::arg("fixed_bytes") = 0,
        "Task ids of the next batch. policy 'throughput' (lockstep, fill) or 'latency' (each request's\n"
        "earliest unfinished task only; other requests fill). Never exceeds max_rows or the budget\n"
        "(fixed_bytes + sum(rows * bytes_per_row); budget_bytes <= 0: no limit); one model per batch.");

  py::class_<ViewQueue>(m, "ViewQueue", "Bounded FIFO of Python objects with backpressure.")
      .def(py::init<size_t>(), py::arg("capacity"))
      .def("push", &ViewQueue::push, py::arg("item"), "Blocks while full; False if the queue was closed.")
      .def("pop", &ViewQueue::pop, py::arg("timeout") = -1.0,
           "Next item; None on timeout or when closed and drained. Releases the GIL while waiting.")
      .def("close", &ViewQueue::close)
      .def_property_readonly("closed", &ViewQueue::closed)
      .def_property_readonly("capacity", &ViewQueue::capacity)
      .def("__len__", &ViewQueue::size);

  py::class_<LoopStats>(m, "LoopStats")
      .def_readonly("batches", &LoopStats::batches)
      .def_readonly("task_steps", &LoopStats::task_steps)
      .def_readonly("callback_s", &LoopStats::callback_s)
      .def_readonly("overhead_s", &LoopStats::overhead_s);

  py::class_<StepLoop>(m, "StepLoop",
                       "The step loop on its own thread: plans a batch, calls run_batch(ids) ->\n"
                       "(finished_ids, failed_request_ids), then on_done(id) per finished task.")
      .def(py::init<const std::string&, int, int64_t, int64_t, py::function, py::function>(), py::arg("policy"),
           py::arg("max_rows"), py::arg("budget_bytes"), py::arg("fixed_bytes"), py::arg("run_batch"),
           py::arg("on_done"))
      .def("add_task", &StepLoop::add_task, py::arg("id"), py::arg("request"), py::arg("window"), py::arg("model"),
           py::arg("rows"), py::arg("steps_total"), py::arg("bytes_per_row"), py::arg("deps"))
      .def("cancel", &StepLoop::cancel, py::arg("request"))
      .def("start", &StepLoop::start)
      .def("shutdown", &StepLoop::shutdown)
      .def("wait_idle", &StepLoop::wait_idle, py::arg("timeout") = -1.0)
      .def_property_readonly("pending", &StepLoop::pending)
      .def_property_readonly("running", &StepLoop::running)
      .def_property_readonly("stats", &StepLoop::stats);

  m.def("shutdown_all_loops", &StepLoop::shutdown_all,
        "Stop and join every live StepLoop. Registered with atexit: no loop thread outlives the\n"
        "interpreter (a thread asking a finalizing interpreter for the GIL aborts the process).");
  py::module_::import("atexit").attr("register")(m.attr("shutdown_all_loops"));
}
