#include "scheduler.hpp"

#include <algorithm>
#include <set>
#include <stdexcept>

namespace dp360rt {

using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Policy parse_policy(const std::string& name) {
  if (name == "throughput") return Policy::Throughput;
  if (name == "latency") return Policy::Latency;
  throw std::invalid_argument("unknown policy '" + name + "' (expected 'throughput' or 'latency')");
}

std::vector<int64_t> plan_batch(const std::vector<TaskInfo>& tasks, Policy policy, int max_rows,
                                int64_t budget_bytes, int64_t fixed_bytes) {
  std::vector<const TaskInfo*> eligible;
  for (const auto& t : tasks)
    if (t.ready && t.steps_done < t.steps_total) eligible.push_back(&t);
  if (policy == Policy::Latency) {
    // Only the earliest unfinished task of each request (by window order) may run.
    std::map<int64_t, const TaskInfo*> first;
    for (const auto& t : tasks) {
      if (t.steps_done >= t.steps_total) continue;
      auto it = first.find(t.request);
      if (it == first.end() || t.window < it->second->window) first[t.request] = &t;
    }
    std::vector<const TaskInfo*> kept;
    for (auto* t : eligible)
      if (first[t->request] == t) kept.push_back(t);
    eligible.swap(kept);
    std::stable_sort(eligible.begin(), eligible.end(), [](const TaskInfo* a, const TaskInfo* b) {
      return a->request != b->request ? a->request < b->request : a->window < b->window;
    });
  } else {
    std::stable_sort(eligible.begin(), eligible.end(), [](const TaskInfo* a, const TaskInfo* b) {
      if (a->steps_done != b->steps_done) return a->steps_done < b->steps_done;
      if (a->request != b->request) return a->request < b->request;
      return a->window < b->window;
    });
  }
  std::vector<int64_t> out;
  int rows = 0;
  int64_t bytes = fixed_bytes;
  int model = -1;
  for (auto* t : eligible) {
    if (model != -1 && t->model != model) continue;
    int64_t need = bytes + static_cast<int64_t>(t->rows) * t->bytes_per_row;
    if (rows + t->rows > max_rows || (budget_bytes > 0 && need > budget_bytes)) continue;
    model = t->model;
    rows += t->rows;
    bytes = need;
    out.push_back(t->id);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
ViewQueue::ViewQueue(size_t capacity) : capacity_(capacity) {
  if (capacity == 0) throw std::invalid_argument("ViewQueue capacity must be >= 1");
}

bool ViewQueue::push(py::object item) {
  {
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> lk(mu_);
    not_full_.wait(lk, [&] { return closed_ || items_.size() < capacity_; });
    if (closed_) return false;
  }
  // Re-take the lock with the GIL held (the GIL is never awaited while mu_ is held).
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_) return false;
  items_.push_back(std::move(item));
  not_empty_.notify_one();
  return true;
}

py::object ViewQueue::pop(double timeout_s) {
  py::object item;
  bool got = false;
  {
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> lk(mu_);
    auto ready = [&] { return closed_ || !items_.empty(); };
    if (timeout_s < 0)
      not_empty_.wait(lk, ready);
    else
      not_empty_.wait_for(lk, std::chrono::duration<double>(timeout_s), ready);
    if (!items_.empty()) {
      // Moving a py::object transfers the reference without touching the refcount.
      item = std::move(items_.front());
      items_.pop_front();
      got = true;
      not_full_.notify_one();
    }
  }
  if (!got) return py::none();
  return item;
}

void ViewQueue::close() {
  std::lock_guard<std::mutex> lk(mu_);
  closed_ = true;
  not_full_.notify_all();
  not_empty_.notify_all();
}

bool ViewQueue::closed() const {
  std::lock_guard<std::mutex> lk(mu_);
  return closed_;
}

size_t ViewQueue::size() const {
  std::lock_guard<std::mutex> lk(mu_);
  return items_.size();
}

// ---------------------------------------------------------------------------------------------
// Live loops, for shutdown_all at interpreter exit. Touched only with the GIL held.
static std::set<StepLoop*>& live_loops() {
  static auto* loops = new std::set<StepLoop*>();   // never destroyed: used during finalization
  return *loops;
}

StepLoop::StepLoop(const std::string& policy, int max_rows, int64_t budget_bytes, int64_t fixed_bytes,
                   py::function run_batch, py::function on_done)
    : core_(std::make_shared<Core>()) {
  if (max_rows <= 0) throw std::invalid_argument("max_rows must be >= 1");
  Core& c = *core_;
  c.policy_ = parse_policy(policy);
  c.max_rows_ = max_rows;
  c.budget_bytes_ = budget_bytes;
  c.fixed_bytes_ = fixed_bytes;
  c.run_batch_ = std::move(run_batch);
  c.on_done_ = std::move(on_done);
  live_loops().insert(this);
}

StepLoop::~StepLoop() {
  live_loops().erase(this);
  core_->request_stop();
  if (thread_.joinable() && thread_.get_id() == std::this_thread::get_id()) {
    // Destroyed inside one of our own callbacks: joining would wait for ourselves. The thread
    // keeps the state alive and leaves once this callback returns; the Python callbacks are
    // released here, where the GIL is held, not at thread exit, where it is not.
    core_->run_batch_ = py::function();
    core_->on_done_ = py::function();
    thread_.detach();
    return;
  }
  stop_and_join();
}

void StepLoop::stop_and_join() {
  core_->request_stop();
  // Called from a callback on the loop thread: it stops once that callback returns.
  if (thread_.joinable() && thread_.get_id() == std::this_thread::get_id()) return;
  // The loop may be waiting for the GIL to run a callback: never join while holding it.
  if (PyGILState_Check()) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lk(join_mu_);
    if (thread_.joinable()) thread_.join();
  } else {
    std::lock_guard<std::mutex> lk(join_mu_);
    if (thread_.joinable()) thread_.join();
  }
}

void StepLoop::shutdown_all() {
  // One at a time, re-reading the set: a loop may be destroyed while another is being joined.
  std::set<StepLoop*> seen;
  while (true) {
    StepLoop* next = nullptr;
    for (StepLoop* l : live_loops())
      if (!seen.count(l)) {
        next = l;
        break;
      }
    if (!next) return;
    seen.insert(next);
    next->shutdown();
  }
}

void StepLoop::Core::request_stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  idle_cv_.notify_all();
}

void StepLoop::add_task(int64_t id, int64_t request, int window, int model, int rows, int steps_total,
                        int64_t bytes_per_row, const std::vector<int64_t>& deps) {
  Core& c = *core_;
  if (rows <= 0 || steps_total <= 0) throw std::invalid_argument("rows and steps_total must be >= 1");
  if (rows > c.max_rows_)
    throw std::invalid_argument("task of " + std::to_string(rows) + " rows exceeds max_rows=" +
                                std::to_string(c.max_rows_) + "; raise max_rows");
  if (c.budget_bytes_ > 0 && c.fixed_bytes_ + rows * bytes_per_row > c.budget_bytes_)
    throw std::invalid_argument("task needs about " + std::to_string(c.fixed_bytes_ + rows * bytes_per_row) +
                                " bytes, more than the budget of " + std::to_string(c.budget_bytes_) +
                                "; raise max_memory");
  {
    std::lock_guard<std::mutex> lk(c.mu_);
    if (c.tasks_.count(id)) throw std::invalid_argument("task id " + std::to_string(id) + " already exists");
    Task t;
    t.info = TaskInfo{id, request, window, model, rows, 0, steps_total, bytes_per_row, true};
    t.deps = deps;
    c.tasks_[id] = std::move(t);
  }
  c.cv_.notify_all();
}

void StepLoop::Core::drop_request_locked(int64_t request) {
  for (auto it = tasks_.begin(); it != tasks_.end();) {
    if (it->second.info.request == request)
      it = tasks_.erase(it);
    else
      ++it;
  }
}

void StepLoop::cancel(int64_t request) {
  Core& c = *core_;
  {
    std::lock_guard<std::mutex> lk(c.mu_);
    c.drop_request_locked(request);
  }
  c.cv_.notify_all();
  c.idle_cv_.notify_all();
}

std::vector<TaskInfo> StepLoop::Core::snapshot_locked() const {
  std::vector<TaskInfo> out;
  out.reserve(tasks_.size());
  for (const auto& kv : tasks_) {
    const Task& t = kv.second;
    if (t.done) continue;
    TaskInfo info = t.info;
    info.ready = std::all_of(t.deps.begin(), t.deps.end(), [&](int64_t d) {
      auto it = tasks_.find(d);
      return it == tasks_.end() || it->second.done;  // a finished dependency may be gone already
    });
    out.push_back(info);
  }
  return out;
}

void StepLoop::Core::finish_locked(int64_t id) {
  auto it = tasks_.find(id);
  if (it != tasks_.end()) it->second.done = true;
}

void StepLoop::start() {
  std::lock_guard<std::mutex> jl(join_mu_);
  if (thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lk(core_->mu_);
    core_->stop_ = false;
  }
  std::shared_ptr<Core> core = core_;
  thread_ = std::thread([core] { core->loop(); });
}

void StepLoop::shutdown() { stop_and_join(); }

size_t StepLoop::pending() const {
  std::lock_guard<std::mutex> lk(core_->mu_);
  size_t n = 0;
  for (const auto& kv : core_->tasks_)
    if (!kv.second.done) ++n;
  return n;
}

bool StepLoop::running() const {
  std::lock_guard<std::mutex> lk(core_->mu_);
  return thread_.joinable() && !core_->stop_;
}

LoopStats StepLoop::stats() const {
  std::lock_guard<std::mutex> lk(core_->mu_);
  return core_->stats_;
}

bool StepLoop::wait_idle(double timeout_s) {
  Core& c = *core_;
  py::gil_scoped_release release;
  std::unique_lock<std::mutex> lk(c.mu_);
  auto idle = [&] {
    if (c.stop_) return true;
    if (c.busy_) return false;
    for (const auto& kv : c.tasks_)
      if (!kv.second.done) return false;
    return true;
  };
  if (timeout_s < 0) {
    c.idle_cv_.wait(lk, idle);
    return true;
  }
  return c.idle_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), idle);
}

void StepLoop::Core::loop() {
  while (true) {
    auto t0 = Clock::now();
    std::vector<int64_t> batch;
    {
      std::unique_lock<std::mutex> lk(mu_);
      while (!stop_) {
        // Finished tasks whose dependants no longer need them are forgotten.
        batch = plan_batch(snapshot_locked(), policy_, max_rows_, budget_bytes_, fixed_bytes_);
        if (!batch.empty()) break;
        busy_ = false;
        idle_cv_.notify_all();
        cv_.wait(lk);
        t0 = Clock::now();
      }
      if (stop_) {
        busy_ = false;
        idle_cv_.notify_all();
        return;
      }
      busy_ = true;
    }
    double overhead = seconds_since(t0);
    auto tc = Clock::now();
    std::vector<int64_t> finished, failed;
    {
      py::gil_scoped_acquire gil;
      try {
        py::function fn = run_batch_;   // a copy: the member may be emptied during the call
        if (!fn) return;
        py::tuple res = fn(batch);
        finished = res[0].cast<std::vector<int64_t>>();
        failed = res[1].cast<std::vector<int64_t>>();
      } catch (std::exception& e) {
        // The Python side reports per-request failures itself; reaching here is a bug in the glue.
        // Fail the whole batch rather than spin on it.
        if (auto* pe = dynamic_cast<py::error_already_set*>(&e)) {
          pe->restore();
          PyErr_Print();
        }
        std::lock_guard<std::mutex> lk(mu_);
        for (int64_t id : batch) {
          auto it = tasks_.find(id);
          if (it != tasks_.end()) failed.push_back(it->second.info.request);
        }
      }
    }
    double cb = seconds_since(tc);
    auto tb = Clock::now();
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (int64_t r : failed) drop_request_locked(r);
      for (int64_t id : batch) {
        auto it = tasks_.find(id);
        if (it != tasks_.end()) {
          it->second.info.steps_done += 1;
          stats_.task_steps += 1;
        }
      }
      for (int64_t id : finished) finish_locked(id);
      stats_.batches += 1;
    }
    overhead += seconds_since(tb);
    // Finished tasks are handed over one by one; on_done may block (full view queue).
    for (int64_t id : finished) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) break;                 // shutting down: nobody will read the views
        if (!tasks_.count(id)) continue;  // cancelled meanwhile
      }
      auto td = Clock::now();
      {
        py::gil_scoped_acquire gil;
        try {
          py::function fn = on_done_;
          if (fn) fn(id);
        } catch (std::exception& e) {
          if (auto* pe = dynamic_cast<py::error_already_set*>(&e)) {
            pe->restore();
            PyErr_Print();
          }
        }
      }
      cb += seconds_since(td);
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      // Drop finished tasks nobody depends on any more.
      for (auto it = tasks_.begin(); it != tasks_.end();) {
        bool needed = false;
        if (it->second.done)
          for (const auto& kv : tasks_)
            if (!kv.second.done &&
                std::find(kv.second.deps.begin(), kv.second.deps.end(), it->first) != kv.second.deps.end())
              needed = true;
        if (it->second.done && !needed)
          it = tasks_.erase(it);
        else
          ++it;
      }
      stats_.callback_s += cb;
      stats_.overhead_s += overhead;
    }
  }
}

}  // namespace dp360rt
