// dp360rt._C: small native helpers (CPU only, no torch / CUDA dependency).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#ifndef DP360RT_VERSION
#define DP360RT_VERSION "0.1.0"
#endif

namespace py = pybind11;

namespace {

std::string version() { return DP360RT_VERSION; }

// Split views [0, num_views) into consecutive windows of frames_per_window.
std::vector<std::vector<int>> plan_windows(int num_views, int frames_per_window) {
    if (frames_per_window <= 0) {
        throw std::invalid_argument("frames_per_window must be > 0, got " +
                                    std::to_string(frames_per_window));
    }
    if (num_views <= 0 || num_views % frames_per_window != 0) {
        throw std::invalid_argument(
            "num_views must be a positive multiple of frames_per_window (" +
            std::to_string(frames_per_window) + "), got " + std::to_string(num_views));
    }
    const int n_windows = num_views / frames_per_window;
    std::vector<std::vector<int>> windows;
    windows.reserve(static_cast<size_t>(n_windows));
    for (int w = 0; w < n_windows; ++w) {
        std::vector<int> win;
        win.reserve(static_cast<size_t>(frames_per_window));
        for (int f = 0; f < frames_per_window; ++f) {
            win.push_back(w * frames_per_window + f);
        }
        windows.push_back(std::move(win));
    }
    return windows;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "dp360rt native helpers (CPU only; no torch/CUDA dependency).";

    m.def("version", &version,
          "Return the version string of the dp360rt native extension (e.g. \"0.1.0\").");

    m.def("plan_windows", &plan_windows, py::arg("num_views"), py::arg("frames_per_window"),
          "Split view indices 0..num_views-1 into consecutive windows.\n\n"
          "Returns a list of num_views // frames_per_window lists, each holding\n"
          "frames_per_window consecutive view indices, e.g.\n"
          "plan_windows(4, 2) == [[0, 1], [2, 3]].\n\n"
          "Raises ValueError if frames_per_window <= 0 or if num_views is not a\n"
          "positive multiple of frames_per_window.");
}
