// The request scheduler of dp360rt: a planner that packs sampling tasks into batches under a
// row limit and a memory budget, a step loop on its own thread that drives an execution callback,
// and a bounded view queue with backpressure.
//
// Threading rule (no deadlock with the GIL): the loop thread never waits for the GIL while it
// holds the scheduler mutex, and every blocking wait called from Python releases the GIL first.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace dp360rt {

namespace py = pybind11;

// One sampling task as the planner sees it: a back view or one window of a request.
struct TaskInfo {
  int64_t id = 0;
  int64_t request = 0;
  int window = 0;          // order inside the request (back view -1, then windows 0, 1, ...)
  int model = 0;           // tasks of different models never share a batch
  int rows = 1;            // latents sampled together (frames of a window); never split
  int steps_done = 0;
  int steps_total = 1;
  int64_t bytes_per_row = 0;
  bool ready = true;       // dependencies finished
};

enum class Policy { Throughput, Latency };
Policy parse_policy(const std::string& name);

// Picks the tasks of the next batch. throughput: all ready tasks, fewest steps done first
// (lockstep), filled up to the limits. latency: per request only its earliest unfinished task is
// eligible (window 0 finishes and streams first); other requests fill the rest of the batch.
// All tasks of a batch use the model of the first pick. Never exceeds max_rows or the budget
// (fixed_bytes + sum(rows * bytes_per_row)); returns an empty list when nothing is runnable.
std::vector<int64_t> plan_batch(const std::vector<TaskInfo>& tasks, Policy policy, int max_rows,
                                int64_t budget_bytes, int64_t fixed_bytes);

// Bounded FIFO of Python objects. push blocks while full (backpressure); pop blocks while empty.
class ViewQueue {
 public:
  explicit ViewQueue(size_t capacity);
  // Returns false when the queue was closed (the item is dropped).
  bool push(py::object item);
  // Returns None on timeout (seconds < 0: wait forever) or when closed and empty.
  py::object pop(double timeout_s);
  void close();
  bool closed() const;
  size_t size() const;
  size_t capacity() const { return capacity_; }

 private:
  size_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable not_full_, not_empty_;
  std::deque<py::object> items_;
  bool closed_ = false;
};

struct LoopStats {
  int64_t batches = 0;
  int64_t task_steps = 0;
  double callback_s = 0.0;   // time inside the execution callbacks
  double overhead_s = 0.0;   // time in the loop itself (planning, bookkeeping, waking)
};

// The step loop. run_batch(ids) -> (finished_task_ids, failed_request_ids) advances every task of
// the batch by one step; on_done(task_id) is called for each finished task (it may block, e.g. on a
// full ViewQueue, which pauses the loop: backpressure).
//
// The thread stops and is joined on every path: shutdown(), destruction (garbage collection; the
// GIL is released while joining), and interpreter exit (shutdown_all, registered with atexit by
// the module), so no joinable std::thread is ever destroyed and the loop never asks for the GIL of
// a finalizing interpreter. Destruction from the loop thread itself (a callback dropped the last
// reference) cannot join; the thread then leaves after that callback, owning the shared state.
class StepLoop {
 public:
  StepLoop(const std::string& policy, int max_rows, int64_t budget_bytes, int64_t fixed_bytes,
           py::function run_batch, py::function on_done);
  ~StepLoop();
  StepLoop(const StepLoop&) = delete;
  StepLoop& operator=(const StepLoop&) = delete;

  void add_task(int64_t id, int64_t request, int window, int model, int rows, int steps_total,
                int64_t bytes_per_row, const std::vector<int64_t>& deps);
  void cancel(int64_t request);         // its tasks are dropped; returns at once
  void start();
  void shutdown();                      // stops and joins the thread (releases the GIL while joining)
  bool wait_idle(double timeout_s);     // until no task is pending (releases the GIL)
  size_t pending() const;
  bool running() const;
  LoopStats stats() const;
  // Stops and joins every live loop (called at interpreter exit, GIL held).
  static void shutdown_all();

 private:
  struct Task {
    TaskInfo info;
    std::vector<int64_t> deps;
    bool done = false;
    bool dropped = false;
  };
  // Everything the loop thread touches; the thread holds a reference of its own.
  struct Core {
    Policy policy_;
    int max_rows_;
    int64_t budget_bytes_, fixed_bytes_;
    py::function run_batch_, on_done_;   // emptied (GIL held) before the thread may outlive us
    mutable std::mutex mu_;
    std::condition_variable cv_, idle_cv_;
    std::map<int64_t, Task> tasks_;
    bool stop_ = false;
    bool busy_ = false;
    LoopStats stats_;

    void loop();
    void request_stop();
    std::vector<TaskInfo> snapshot_locked() const;
    void finish_locked(int64_t id);
    void drop_request_locked(int64_t request);
  };
  void stop_and_join();

  std::shared_ptr<Core> core_;
  std::mutex join_mu_;                  // one joiner at a time (shutdown_all vs. destructor)
  std::thread thread_;
};

}  // namespace dp360rt
