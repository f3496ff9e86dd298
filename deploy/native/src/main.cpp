// edgetl-device: classify and fine-tune on the device with an edgetl bundle, on ExecuTorch's C++
// runtime alone (no Python, no libtorch). Usage: edgetl-device --help.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "build_info.h"
#include "bundle.h"
#include "commands.h"
#include "files.h"
#include "runtime.h"
#include "state.h"

namespace {

const char* kUsage = R"(usage: edgetl-device [--threads N] [--verbose] COMMAND ...

  info      BUNDLE
  classify  BUNDLE IMAGE_OR_DIR... [--trained STATE_DIR|PTD] [--top-k N (3)] [--json]
  finetune  BUNDLE DATA_DIR --state STATE_DIR [--epochs N (5; at most 1000000; 0: only imprint new classes)] [--batch-size B (the bundle's)]
            [--optimizer sgd|adamw] [--lr X] [--weight-decay X] [--momentum X] (SGD)
            [--betas B1,B2] [--eps X] (AdamW) (defaults: the bundle's optimizer and settings)
            [--seed N (0)] [--augment] [--val DIR] [--feature-budget MIB (64)]
            [--replay-ratio R (0.5 with the bundle's replay set, else 0)]
            [--memory-limit MIB (the cgroup's memory.max / memory.limit_in_bytes)]
  import-weights  BUNDLE NPY_DIR --state STATE_DIR
  export-weights  BUNDLE STATE_DIR|PTD --out NPY_DIR

  --threads N   ExecuTorch thread-pool size (default: the runtime's, one per core)
  --verbose     show ExecuTorch's own log lines and, in finetune, memory after each phase
  --version     the runner's architecture and the ExecuTorch release it is built against

classify prints "PATH: LABEL PROB, ..." per image (--json: one JSON object per line, full precision).
DATA_DIR and --val hold one subfolder per class, named like the bundle's classes (JPEG or PNG).
A class folder the bundle does not know takes one of its spare outputs (edgetl export --spare-classes)
and starts from weight imprinting (its photos' mean normalised embedding); the state directory
records the device's classes, which classify --trained names.
finetune computes the frozen bottom's features once per image (in memory up to --feature-budget
MiB, beyond it in a memory-mapped file in STATE_DIR; --augment adds random horizontal flips and
recomputes them every step), trains with SGD or AdamW, and saves weights and the optimizer's state
(SGD's momentum; AdamW's moments and step count) atomically after every epoch: running the same
command again resumes after the last saved epoch, with the optimizer it was trained with. Weight
decay applies to the parameters the bundle lists (weights of 2 or more dimensions, never norms or
biases). Before it starts, finetune compares its memory need (runtime, weights, the program's
planned arena, the optimizer's state and the
features within --feature-budget: edgetl plan --runtime native's sum) with its memory limit and
refuses when it does not fit. With a replay set in the bundle (edgetl export --replay-per-class),
round(B * R) rows of each batch of B are its stored features of the known classes, taken in a
seeded order (--seed, per epoch), and the rest photos of DATA_DIR; an epoch still sees each photo once.
import-weights starts a new STATE_DIR at epoch 0 from NPY_DIR/NAME.npy (NAME: a training tensor's
state-dict name; tensors without a file keep the bundle's values); finetune then trains from them.
export-weights writes every training tensor as NPY_DIR/NAME.npy. A fleet client does both each round.
Exit status: 0 ok, 2 a user error (one line on stderr), 1 an internal error.
)";

constexpr long long kMaxInt = std::numeric_limits<int>::max();
constexpr long long kMaxThreads = 1024;  // far above any device's cores; the runtime's pool allocates per thread

constexpr const char* kCommands = "info, classify, finetune, import-weights, export-weights";

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> values;
  std::map<std::string, bool> flags;
};

// Options taking a value and plain flags, per command ("" = global).
const std::map<std::string, std::vector<std::string>> kValueOptions = {
    {"", {"--threads"}},
    {"classify", {"--trained", "--top-k"}},
    {"finetune",
     {"--state", "--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay", "--seed", "--val", "--feature-budget",
      "--memory-limit", "--replay-ratio", "--optimizer", "--betas", "--eps"}},
    {"import-weights", {"--state"}},
    {"export-weights", {"--out"}},
    {"info", {}}};
const std::map<std::string, std::vector<std::string>> kFlags = {{"", {"--verbose"}}, {"classify", {"--json"}}, {"finetune", {"--augment"}}};

bool listed(const std::map<std::string, std::vector<std::string>>& table, const std::string& cmd, const std::string& opt) {
  for (const auto& key : {std::string(), cmd}) {
    auto it = table.find(key);
    if (it != table.end())
      for (const auto& o : it->second)
        if (o == opt) return true;
  }
  return false;
}

Args parse(int argc, char** argv, std::string* command) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool has_value = false;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
      has_value = true;
    }
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg == "--version") {
      std::cout << "edgetl-device " << edgetl::kArch << ", ExecuTorch " << edgetl::kExecutorchVersion << "\n";
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) {
      if (command->empty()) {
        if (!kValueOptions.count(arg)) throw edgetl::DeviceError("unknown command '" + arg + "' (" + kCommands + ")");
        *command = arg;
      } else {
        a.positional.push_back(arg);
      }
    } else if (listed(kFlags, *command, arg)) {
      a.flags[arg] = true;
    } else if (listed(kValueOptions, *command, arg)) {
      if (!has_value) {
        if (i + 1 >= argc) throw edgetl::DeviceError(arg + " needs a value");
        value = argv[++i];
      }
      a.values[arg] = value;
    } else {
      throw edgetl::DeviceError("unknown option " + arg + (command->empty() ? "" : " for " + *command) + " (see --help)");
    }
  }
  if (command->empty()) throw edgetl::DeviceError(std::string("no command given (") + kCommands + "; see --help)");
  return a;
}

// The integer value of `opt` in [min, max] (checked before any narrowing, so 4294967297 is no 1).
long long to_int(const Args& a, const std::string& opt, long long fallback, long long min, long long max) {
  auto it = a.values.find(opt);
  if (it == a.values.end()) return fallback;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(it->second.c_str(), &end, 10);
  if (errno || end == it->second.c_str() || *end || v < min || v > max)
    throw edgetl::DeviceError(opt + " must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "], got '" +
                              it->second + "'");
  return v;
}

std::optional<double> to_double(const Args& a, const std::string& opt) {
  auto it = a.values.find(opt);
  if (it == a.values.end()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(it->second.c_str(), &end);
  if (errno || end == it->second.c_str() || *end) throw edgetl::DeviceError(opt + " must be a number, got '" + it->second + "'");
  return v;
}

// "B1,B2": two numbers (--betas).
std::pair<double, double> to_pair(const Args& a, const std::string& opt) {
  const std::string& v = a.values.at(opt);
  const size_t comma = v.find(',');
  const std::string bad = opt + " must be two numbers B1,B2, got '" + v + "'";
  if (comma == std::string::npos) throw edgetl::DeviceError(bad);
  Args parts;
  parts.values = {{"first", v.substr(0, comma)}, {"second", v.substr(comma + 1)}};
  try {
    return {*to_double(parts, "first"), *to_double(parts, "second")};
  } catch (const edgetl::DeviceError&) {
    throw edgetl::DeviceError(bad);
  }
}

void need(const Args& a, size_t n, const char* what) {
  if (a.positional.size() < n) throw edgetl::DeviceError(std::string("missing ") + what + " (see --help)");
}

int run(int argc, char** argv) {
  std::string command;
  Args a = parse(argc, argv, &command);
  edgetl::init_runtime(a.flags.count("--verbose") > 0);
  if (a.values.count("--threads")) edgetl::set_threads(static_cast<unsigned>(to_int(a, "--threads", 0, 1, kMaxThreads)));
  need(a, 1, "BUNDLE");
  edgetl::Bundle bundle(a.positional[0]);
  const bool verbose = a.flags.count("--verbose") > 0;
  if (command == "info") {
    edgetl::info(bundle);
    return 0;
  }
  if (command == "classify") {
    need(a, 2, "IMAGE_OR_DIR");
    edgetl::ClassifyOptions o;
    o.images.assign(a.positional.begin() + 1, a.positional.end());
    o.trained = a.values.count("--trained") ? a.values.at("--trained") : "";
    o.top_k = static_cast<int>(to_int(a, "--top-k", 3, 1, kMaxInt));
    o.json = a.flags.count("--json") > 0;
    int code = edgetl::classify(bundle, o);
    edgetl::log_memory(verbose, "classifying");
    return code;
  }
  if (command == "import-weights" || command == "export-weights") {
    const bool in = command == "import-weights";
    need(a, 2, in ? "NPY_DIR" : "STATE_DIR|PTD");
    if (a.positional.size() > 2) throw edgetl::DeviceError("unexpected argument '" + a.positional[2] + "'");
    const char* opt = in ? "--state" : "--out";
    if (!a.values.count(opt)) throw edgetl::DeviceError(command + " needs " + opt + (in ? " STATE_DIR" : " NPY_DIR"));
    return in ? edgetl::import_weights(bundle, a.positional[1], a.values.at(opt))
              : edgetl::export_weights(bundle, a.positional[1], a.values.at(opt));
  }
  need(a, 2, "DATA_DIR");
  if (a.positional.size() > 2) throw edgetl::DeviceError("unexpected argument '" + a.positional[2] + "'");
  if (!a.values.count("--state")) throw edgetl::DeviceError("finetune needs --state STATE_DIR");
  edgetl::FinetuneOptions o;
  o.data = a.positional[1];
  o.state = a.values.at("--state");
  o.val = a.values.count("--val") ? a.values.at("--val") : "";
  o.epochs = static_cast<int>(to_int(a, "--epochs", 5, 0, edgetl::kMaxEpochs));
  if (a.values.count("--batch-size")) o.batch_size = static_cast<int>(to_int(a, "--batch-size", 0, 1, kMaxInt));
  o.lr = to_double(a, "--lr");
  o.momentum = to_double(a, "--momentum");
  o.weight_decay = to_double(a, "--weight-decay");
  if (a.values.count("--optimizer")) o.optimizer = a.values.at("--optimizer");
  if (a.values.count("--betas")) o.betas = to_pair(a, "--betas");
  o.eps = to_double(a, "--eps");
  o.seed = static_cast<uint64_t>(to_int(a, "--seed", 0, 0, std::numeric_limits<long long>::max()));
  o.augment = a.flags.count("--augment") > 0;
  o.replay_ratio = to_double(a, "--replay-ratio");
  o.feature_budget = to_int(a, "--feature-budget", 64, 0, std::numeric_limits<int64_t>::max() >> 20) << 20;
  if (a.values.count("--memory-limit")) o.memory_limit = to_int(a, "--memory-limit", 0, 1, std::numeric_limits<int64_t>::max() >> 20) << 20;
  o.verbose = verbose;
  return edgetl::finetune(bundle, o);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const edgetl::DeviceError& e) {
    std::cerr << "edgetl-device: error: " << e.what() << std::endl;
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "edgetl-device: error: out of memory" << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "edgetl-device: internal error: " << e.what() << std::endl;
    return 1;
  }
}
