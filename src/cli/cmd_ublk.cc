// qcow2kit ublk add | list | del: an image as a Linux block device (/dev/ublkbN) through the
// kernel's ublk driver. `add` creates the device, prints its path once it is live and serves
// it (as a daemon unless --foreground) until SIGTERM / SIGINT or `ublk del`; then requests
// finish, the image is flushed and closed clean, and the device is removed.
//
// Threads: the main thread owns the image and runs queue 0 on its io_uring reactor; queues
// 1.. have a thread and reactor each (export/ublk/queues.h); a control thread sends START_DEV
// (which returns only once every queue has fetched every tag, so it cannot come from a queue's
// thread) and then waits for the signal that stops the device.
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "cli/daemon.h"
#include "export/ublk/control.h"
#include "export/ublk/queues.h"
#include "export/ublk/ublk_abi.h"
#include "fmt/format.h"
#include "qcow2kit/block.h"
#include "tools/open_layer.h"
#include "tools/qemu_json.h"

namespace qcow2kit::cli {
namespace {

struct UblkArgs {
  std::string image;
  std::string format;
  int64_t id = -1;  // -n; -1: the kernel picks
  int queues = 0;   // 0: one per CPU, at most 4
  int depth = 128;
  bool read_only = false;
  std::string cache = "none";
  std::string discard = "ignore";
  std::string detect_zeroes = "off";
  bool foreground = false;
  std::string pid_file;
};

constexpr uint32_t kMaxIoBytes = 512 << 10;
// A thread each; the kernel also clamps the count to the CPUs it has.
constexpr int kMaxQueues = 64;

// The parameters the block layer gets: 512-byte sectors over 4 KiB physical blocks, a
// volatile cache with FUA (so flushes and FUA writes reach us), discard and write-zeroes.
ublk_params DeviceParams(const BlockDevice& dev, const ublksrv_ctrl_dev_info& info,
                         bool read_only) {
  ublk_params p{};
  p.len = sizeof(p);
  p.types = UBLK_PARAM_TYPE_BASIC;
  p.basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA | (read_only ? UBLK_ATTR_READ_ONLY : 0);
  p.basic.logical_bs_shift = 9;
  p.basic.physical_bs_shift = 12;
  p.basic.io_min_shift = 12;
  p.basic.io_opt_shift = 12;
  p.basic.max_sectors = info.max_io_buf_bytes >> 9;
  p.basic.dev_sectors = dev.size() >> 9;
  if (!read_only) {
    p.types |= UBLK_PARAM_TYPE_DISCARD;
    p.discard.discard_granularity = 4096;
    p.discard.max_discard_sectors = UINT32_MAX >> 9;
    p.discard.max_write_zeroes_sectors = UINT32_MAX >> 9;
    p.discard.max_discard_segments = 1;
  }
  return p;
}

// Opens /dev/ublkcN, which the kernel (or udev) creates just after ADD_DEV.
Result<int> OpenCharDevice(uint32_t id) {
  const std::string path = fmt::format("/dev/ublkc{}", id);
  for (int tries = 0;; ++tries) {
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd >= 0) return fd;
    if ((errno != ENOENT && errno != EBUSY) || tries == 100) {
      return Status::FromErrno(errno, "open " + path);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// What `ublk list` shows of a device beyond the kernel's view: the image a daemon serves,
// in /run/qcow2kit/ublk-N.json, written once the device is live and removed at the end.
constexpr const char* kStateDir = "/run/qcow2kit";

std::string StatePath(uint32_t id) {
  return fmt::format("{}/ublk-{}.json", kStateDir, id);
}

void WriteState(uint32_t id, const UblkArgs& a, bool read_only) {
  ::mkdir(kStateDir, 0755);
  char real[PATH_MAX];
  tools::Json j = {{"image", ::realpath(a.image.c_str(), real) ? real : a.image},
                   {"read-only", read_only}};
  if (std::FILE* f = std::fopen(StatePath(id).c_str(), "w")) {
    std::fputs(j.dump().c_str(), f);
    std::fclose(f);
  }
}

std::string ImageOf(uint32_t id) {
  std::FILE* f = std::fopen(StatePath(id).c_str(), "r");
  if (!f) return "";
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  std::fclose(f);
  auto j = tools::Json::parse(text, nullptr, false);
  return j.is_object() && j.contains("image") && j["image"].is_string()
             ? j["image"].get<std::string>()
             : "";
}

// `ublk add`, and with `recover` set `ublk recover -n ID`: serves the image until the device
// stops. Recovery takes over a device whose daemon died (state QUIESCED): its queues, depth
// and parameters stay the kernel's; requests the old daemon had not completed are issued again.
int RunServe(const UblkArgs& a, bool recover) {
  const char* command = recover ? "ublk recover" : "ublk add";
  int queues = a.queues;
  if (queues == 0) {
    queues = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 4u));
  }
  if (queues < 1 || queues > kMaxQueues) {
    return UsageError(fmt::format("Invalid number of queues {} (1 to {})", a.queues, kMaxQueues),
                      command);
  }
  if (a.depth < 1 || a.depth > UBLK_MAX_QUEUE_DEPTH) {
    return UsageError(
        fmt::format("Invalid queue depth {} (1 to {})", a.depth, UBLK_MAX_QUEUE_DEPTH), command);
  }
  if (a.id < -1 || a.id >= INT32_MAX) {
    return UsageError(fmt::format("Invalid device id {}", a.id), command);
  }
  if (recover && a.id < 0) return UsageError("ublk recover needs -n ID", command);
  bool discard = false;
  if (a.discard == "unmap" || a.discard == "on") {
    discard = true;
  } else if (a.discard != "ignore" && a.discard != "off") {
    return UsageError("Invalid discard mode '" + a.discard + "' (ignore or unmap)", command);
  }
  auto detect_zeroes = ublk::QueueOptions::DetectZeroes::kOff;
  if (a.detect_zeroes == "on") {
    detect_zeroes = ublk::QueueOptions::DetectZeroes::kOn;
  } else if (a.detect_zeroes == "unmap") {
    detect_zeroes = ublk::QueueOptions::DetectZeroes::kUnmap;
  } else if (a.detect_zeroes != "off") {
    return UsageError("Invalid detect-zeroes mode '" + a.detect_zeroes + "' (off, on or unmap)",
                      command);
  }
  ImageOptions io;
  io.filename = a.image;
  io.format = a.format;
  io.cache = a.cache;
  auto open = ReadOnlyOpenOptions(io);
  if (!open.ok()) return Fail(open.status());

  int ready_fd = -1;
  if (!a.foreground) {
    int r = ForkAndWait(&ready_fd);
    if (r >= 0) return r;
  }
  // A daemon that fails before it is ready exits (after Fail's message); the waiting
  // parent then exits 1 too. Signals are taken by the control thread's sigwait.
  const sigset_t signals = BlockStopSignals();

  auto control = ublk::UblkControl::Open();
  if (!control.ok()) return Fail(control.status());
  ublk::UblkControl& ctl = **control;
  auto features = ctl.GetFeatures();
  if (!features.ok() || (*features & ublk::kFlagCmdIoctlEncode) == 0) {
    return Fail(Status::Unsupported("the kernel's ublk driver is too old (needs Linux 6.5)"));
  }
  // What recovery takes over: the device as the kernel keeps it.
  ublksrv_ctrl_dev_info info{};
  bool read_only = a.read_only;
  uint64_t device_sectors = 0;  // recover: the device's size
  if (recover) {
    auto got = ctl.GetInfo(static_cast<uint32_t>(a.id));
    // The kernel quiesces the device shortly after its daemon died: wait for that.
    for (int i = 0; i < 300 && got.ok() && got->state == UBLK_S_DEV_LIVE &&
                    ::kill(got->ublksrv_pid, 0) != 0 && errno == ESRCH;
         ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      got = ctl.GetInfo(static_cast<uint32_t>(a.id));
    }
    if (!got.ok()) return Fail(got.status().WithContext(fmt::format("ublk device {}", a.id)));
    info = *got;
    if ((info.flags & UBLK_F_USER_RECOVERY) == 0) {
      return Fail(Status::Unsupported(
          fmt::format("ublk device {} was not added with user recovery", a.id)));
    }
    if (info.state != UBLK_S_DEV_QUIESCED) {
      return Fail(Status::Invalid(
          fmt::format("ublk device {} is {}, not quiesced: its daemon is still running", a.id,
                      info.state == UBLK_S_DEV_LIVE ? "live" : "not started")));
    }
    auto params = ctl.GetParams(info.dev_id);
    if (!params.ok()) return Fail(params.status());
    read_only |= (params->basic.attrs & UBLK_ATTR_READ_ONLY) != 0;
    device_sectors = params->basic.dev_sectors;
  }
  open->writable = !read_only;

  auto reactor = MakeReactor(EngineKind::kUring);
  if (!reactor.ok()) return Fail(reactor.status().WithContext("ublk needs io_uring"));
  Reactor& r = **reactor;
  auto img = r.BlockOn(tools::OpenImageChain(a.image, *open));
  if (!img.ok()) return Fail(img.status());
  auto dev = std::make_unique<BlockDevice>(std::move(*img));
  auto close_image = [&] {
    Status s = r.BlockOn(dev->Close());
    dev.reset();
    return s;
  };
  if (recover && dev->size() >> 9 != device_sectors) {
    (void)close_image();
    return Fail(Status::Invalid(
        fmt::format("'{}' has {} sectors, ublk device {} has {}: not the image it served", a.image,
                    dev->size() >> 9, a.id, device_sectors)));
  }

  if (!recover) {
    ublksrv_ctrl_dev_info want{};
    want.nr_hw_queues = static_cast<uint16_t>(queues);
    want.queue_depth = static_cast<uint16_t>(a.depth);
    want.max_io_buf_bytes = kMaxIoBytes;
    want.dev_id = a.id < 0 ? UINT32_MAX : static_cast<uint32_t>(a.id);
    // With user recovery a daemon that dies leaves the device quiesced, its requests waiting
    // for `ublk recover` (and issued again then), instead of failing them.
    want.flags = ublk::kFlagCmdIoctlEncode | UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
    auto added = ctl.AddDevice(want);
    if (!added.ok()) {
      (void)close_image();
      return Fail(added.status());
    }
    info = *added;
  }
  const uint32_t id = info.dev_id;
  // A device this command added goes again on failure; one being recovered stays quiesced
  // for another try.
  auto give_up = [&](Status why) {
    if (!recover) (void)ctl.DeleteDevice(id);
    (void)close_image();
    return Fail(why);
  };
  Status s =
      recover ? ctl.StartUserRecovery(id) : ctl.SetParams(id, DeviceParams(*dev, info, read_only));
  if (!s.ok()) return give_up(s);
  auto char_fd = OpenCharDevice(id);
  if (!char_fd.ok()) return give_up(char_fd.status());
  auto queues_started = ublk::UblkQueues::Start(*char_fd, dev.get(),
                                                {.depth = info.queue_depth,
                                                 .max_io_bytes = info.max_io_buf_bytes,
                                                 .discard = discard,
                                                 .detect_zeroes = detect_zeroes},
                                                info.nr_hw_queues);
  if (!queues_started.ok()) {
    // Queues that started hold fetches that end only with this process: leave at once.
    Fail(queues_started.status());
    (void)ctl.DeleteDeviceLater(id);
    std::_Exit(1);
  }
  ublk::UblkQueues& serving = **queues_started;

  // The control thread: start (while this thread serves the fetches), report, wait for a
  // signal, stop. The stop makes the kernel flush through the queue and abort the fetches.
  std::atomic<bool> control_done = false;
  std::thread control_thread([&] {
    Status started =
        recover ? ctl.EndUserRecovery(id, ::getpid()) : ctl.StartDevice(id, ::getpid());
    if (!started.ok()) {
      // The fetches stay in flight and only end with this process: leave at once, the
      // device deleted once its character device closes.
      Fail(started);
      (void)ctl.DeleteDeviceLater(id);
      std::_Exit(1);
    }
    std::printf("/dev/ublkb%u\n", id);
    std::fflush(stdout);
    if (!a.pid_file.empty()) {
      if (std::FILE* f = std::fopen(a.pid_file.c_str(), "w")) {
        std::fprintf(f, "%d\n", static_cast<int>(::getpid()));
        std::fclose(f);
      }
    }
    WriteState(id, a, read_only);
    ReportReady(&ready_fd, 0);
    int sig = 0;
    ::sigwait(&signals, &sig);
    (void)ctl.StopDevice(id);
    control_done = true;
  });
  serving.Run();
  // Stopped from elsewhere (ublk del): wake the control thread from its sigwait.
  if (!control_done) {
    ::pthread_kill(control_thread.native_handle(), SIGTERM);
  }
  control_thread.join();
  queues_started->reset();
  Status closed = close_image();
  ::close(*char_fd);
  // The pid file goes first: once the device is gone (what `ublk del` waits for), so is it.
  if (!a.pid_file.empty()) ::unlink(a.pid_file.c_str());
  ::unlink(StatePath(id).c_str());
  Status deleted = ctl.DeleteDevice(id);
  if (deleted.code() == ENODEV) deleted = Status::Ok();  // `ublk del` gave up waiting for us
  if (!closed.ok()) return Fail(closed.WithContext("Could not close '" + a.image + "'"));
  if (!deleted.ok()) return Fail(deleted);
  return 0;
}

// The ublk devices the kernel has (one /dev/ublkcN each), in order.
std::vector<uint32_t> DeviceIds() {
  std::vector<uint32_t> ids;
  if (DIR* d = ::opendir("/dev")) {
    while (dirent* e = ::readdir(d)) {
      unsigned id;
      char tail;
      if (std::sscanf(e->d_name, "ublkc%u%c", &id, &tail) == 1) ids.push_back(id);
    }
    ::closedir(d);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

// Stops device `dev`: its daemon finishes the requests, closes the image and deletes the
// device, which this waits for. A device whose daemon is gone (quiesced after a crash) is
// deleted here.
Status StopAndRemove(ublk::UblkControl& ctl, uint32_t dev) {
  auto info = ctl.GetInfo(dev);
  if (!info.ok()) return info.status().WithContext(fmt::format("ublk device {}", dev));
  const pid_t daemon = info->ublksrv_pid;
  const bool orphan = info->state == UBLK_S_DEV_QUIESCED ||
                      (daemon > 0 && ::kill(daemon, 0) != 0 && errno == ESRCH);
  QK_RETURN_IF_ERROR(ctl.StopDevice(dev));
  for (int i = 0; !orphan && i < 600; ++i) {
    if (!ctl.GetInfo(dev).ok()) return Status::Ok();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  Status s = ctl.DeleteDevice(dev);
  return s.code() == ENODEV ? Status::Ok() : s;  // its daemon was just quicker
}

int RunDel(int64_t id, bool all) {
  if (all == (id >= 0)) return UsageError("ublk del needs -n ID or --all", "ublk del");
  if (id >= INT32_MAX) return UsageError(fmt::format("Invalid device id {}", id), "ublk del");
  auto control = ublk::UblkControl::Open();
  if (!control.ok()) return Fail(control.status());
  if (!all) {
    Status s = StopAndRemove(**control, static_cast<uint32_t>(id));
    return s.ok() ? 0 : Fail(s);
  }
  int rc = 0;
  for (uint32_t dev : DeviceIds()) {
    Status s = StopAndRemove(**control, dev);
    // Deleted meanwhile by its daemon or another del: nothing left to do.
    if (!s.ok() && s.code() != ENODEV) rc = Fail(s);
  }
  return rc;
}

const char* StateName(uint16_t state) {
  switch (state) {
    case UBLK_S_DEV_DEAD:
      return "dead";
    case UBLK_S_DEV_LIVE:
      return "live";
    case UBLK_S_DEV_QUIESCED:
      return "quiesced";
  }
  return "unknown";
}

// The devices the kernel has (one /dev/ublkcN each), with what their daemons serve.
int RunList(const std::string& output) {
  auto control = ublk::UblkControl::Open();
  if (!control.ok()) return Fail(control.status());
  const std::vector<uint32_t> ids = DeviceIds();
  tools::Json list = tools::Json::array();
  std::string human = "ID  STATE     QUEUES  DEPTH  PID      IMAGE\n";
  for (uint32_t id : ids) {
    auto info = (*control)->GetInfo(id);
    if (!info.ok()) continue;  // deleted meanwhile
    const std::string image = ImageOf(id);
    list.push_back({{"id", id},
                    {"device", fmt::format("/dev/ublkb{}", id)},
                    {"state", StateName(info->state)},
                    {"queues", info->nr_hw_queues},
                    {"depth", info->queue_depth},
                    {"pid", info->ublksrv_pid},
                    {"image", image}});
    human += fmt::format("{:<3} {:<9} {:<7} {:<6} {:<8} {}\n", id, StateName(info->state),
                         info->nr_hw_queues, info->queue_depth, info->ublksrv_pid, image);
  }
  std::string out = output == "json" ? list.dump(4) + "\n" : human;
  if (!WriteAll(stdout, out)) return Fail(Status::FromErrno(errno, "Could not write output"));
  return 0;
}

}  // namespace

void AddUblkCommand(Cli& cli) {
  auto a = std::make_shared<UblkArgs>();
  auto del_id = std::make_shared<int64_t>(-1);
  auto del_all = std::make_shared<bool>(false);
  CLI::App* cmd = cli.app.add_subcommand("ublk", "Serve an image as a Linux block device (ublk)");
  cmd->require_subcommand(1);
  // add and recover take the same options (recover keeps the device's queues and depth).
  auto serve_options = [](CLI::App* sub, UblkArgs* args) {
    sub->add_option("image", args->image, "Image file")->required();
    sub->add_option("-f,--format", args->format, "Image format: qcow2 or raw (default: probe)");
    sub->add_option("-q,--queues", args->queues,
                    "Hardware queues, a thread each (default: CPUs, at most 4)");
    sub->add_option("-d,--depth", args->depth, "Requests in flight per queue (default 128)");
    sub->add_flag("-r,--read-only", args->read_only, "A read-only device");
    sub->add_option("--cache", args->cache, "none (O_DIRECT, the default) or writeback");
    sub->add_option("--discard", args->discard, "ignore (default) or unmap discards");
    sub->add_option("--detect-zeroes", args->detect_zeroes,
                    "off (default), on (writes of zeros are recorded as zeros) or unmap (and "
                    "deallocated, with --discard=unmap)");
    sub->add_flag("--foreground", args->foreground, "Serve in the foreground (default: daemon)");
    sub->add_option("--pid-file", args->pid_file, "Write the daemon's pid to this file");
  };
  CLI::App* add = cmd->add_subcommand("add", "Create /dev/ublkbN for an image and serve it");
  serve_options(add, a.get());
  add->add_option("-n,--number", a->id, "Device number N of /dev/ublkbN (default: the next free)");
  add->callback([&cli, a] { cli.run = [a] { return RunServe(*a, /*recover=*/false); }; });
  auto rec = std::make_shared<UblkArgs>();
  CLI::App* recover = cmd->add_subcommand(
      "recover", "Serve a device again whose daemon died (its requests are issued again)");
  serve_options(recover, rec.get());
  recover->add_option("-n,--number", rec->id, "Device number")->required();
  recover->callback([&cli, rec] { cli.run = [rec] { return RunServe(*rec, /*recover=*/true); }; });
  auto list_output = std::make_shared<std::string>("human");
  CLI::App* list = cmd->add_subcommand("list", "Show the ublk devices and what they serve");
  AddOutputOption(list, list_output.get());
  list->callback(
      [&cli, list_output] { cli.run = [list_output] { return RunList(*list_output); }; });
  CLI::App* del = cmd->add_subcommand("del", "Stop and remove a device (its daemon exits)");
  del->add_option("-n,--number", *del_id, "Device number");
  del->add_flag("-a,--all", *del_all, "Every ublk device");
  del->callback([&cli, del_id, del_all] {
    cli.run = [del_id, del_all] { return RunDel(*del_id, *del_all); };
  });
}

}  // namespace qcow2kit::cli
