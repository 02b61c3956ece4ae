// UblkQueues: every hardware queue of one ublk device, each on its own thread and io_uring
// reactor. Queue 0 runs on the calling (owner) reactor, which also keeps the image's metadata
// through a SharedDevice; queues 1.. attach ports from their own threads, so their data I/O
// for mapped clusters goes out on their own rings (DESIGN.md, Concurrency).
#pragma once

#include <memory>
#include <thread>
#include <vector>

#include "export/ublk/queue.h"
#include "qcow2kit/block.h"
#include "qcow2kit/shared_device.h"
#include "qcow2kit/status.h"

namespace qcow2kit::ublk {

class UblkQueues {
 public:
  // On the owner reactor: starts `count` queues of /dev/ublkcN (`char_fd`) over `dev` (queue
  // ids 0..count-1, the rest of `options` as given). Returns once every queue thread has its
  // reactor, port and descriptor mapping and has spawned its fetches, or with the first error.
  // After an error the process must end without serving: queues that did start keep fetches
  // in flight that only end when it does.
  static Result<std::unique_ptr<UblkQueues>> Start(int char_fd, BlockDevice* dev,
                                                   const QueueOptions& options, int count);
  ~UblkQueues();

  // Owner thread: serves until every queue's fetches have ended (the device stopped), waits
  // for the queue threads and ends the owner's message loop.
  void Run();

 private:
  struct QueueThread;
  UblkQueues() = default;

  std::unique_ptr<SharedDevice> shared_;
  std::unique_ptr<SharedDevice::Port> own_port_;
  std::unique_ptr<UblkQueue> own_queue_;
  std::vector<std::unique_ptr<QueueThread>> threads_;
};

}  // namespace qcow2kit::ublk
