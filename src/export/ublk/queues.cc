#include "export/ublk/queues.h"

#include <latch>
#include <utility>

#include "fmt/format.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit::ublk {

// One queue served on a thread of its own: reactor, port and queue live on that thread.
struct UblkQueues::QueueThread {
  std::thread thread;
  Status started;  // written by the thread before it counts the latch down
};

namespace {

void ServeQueue(int char_fd, SharedDevice* shared, QueueOptions options, Status* started,
                std::latch* ready) {
  auto reactor = Reactor::Create(EngineKind::kUring);
  if (!reactor.ok()) {
    *started = reactor.status().WithContext(fmt::format("ublk queue {}", options.queue_id));
    ready->count_down();
    return;
  }
  auto port = shared->Attach();
  if (!port.ok()) {
    *started = port.status();
    ready->count_down();
    (*reactor)->RunUntilIdle();
    return;
  }
  auto queue = UblkQueue::Create(char_fd, port->get(), options);
  if (!queue.ok()) {
    *started = queue.status();
    ready->count_down();
    // The process ends without serving (see Start): the shared device may be gone already,
    // so its port must not detach, and the reactor, whose inbox poll never completes, must
    // not wait for it.
    (void)port->release();
    (void)reactor->release();
    return;
  }
  (*queue)->Start();
  ready->count_down();
  // The fetches go out on this reactor's first turn; they end when the device stops.
  while ((*queue)->running() > 0) (*reactor)->RunOnce(true);
  (*port)->Detach();
  (*reactor)->RunUntilIdle();  // the port's message loop ends once the owner let it go
}

}  // namespace

Result<std::unique_ptr<UblkQueues>> UblkQueues::Start(int char_fd, BlockDevice* dev,
                                                      const QueueOptions& options, int count) {
  auto q = std::unique_ptr<UblkQueues>(new UblkQueues());
  auto shared = SharedDevice::Create(dev);
  if (!shared.ok()) return shared.status();
  q->shared_ = std::move(*shared);
  std::latch ready(count - 1);
  for (int i = 1; i < count; ++i) {
    auto t = std::make_unique<QueueThread>();
    QueueOptions o = options;
    o.queue_id = static_cast<uint16_t>(i);
    t->thread = std::thread(ServeQueue, char_fd, q->shared_.get(), o, &t->started, &ready);
    q->threads_.push_back(std::move(t));
  }
  ready.wait();
  Status failed;
  for (auto& t : q->threads_) {
    if (!t->started.ok() && failed.ok()) failed = t->started;
  }
  auto port = q->shared_->Attach();
  if (port.ok()) {
    q->own_port_ = std::move(*port);
    QueueOptions o = options;
    o.queue_id = 0;
    auto queue = UblkQueue::Create(char_fd, q->own_port_.get(), o);
    if (queue.ok()) {
      q->own_queue_ = std::move(*queue);
    } else if (failed.ok()) {
      failed = queue.status();
    }
  } else if (failed.ok()) {
    failed = port.status();
  }
  if (!failed.ok()) {
    // Queue threads that started use the shared device until the process ends: keep it.
    (void)q->shared_.release();
    (void)q->own_port_.release();
    return failed;
  }
  q->own_queue_->Start();
  return q;
}

void UblkQueues::Run() {
  Reactor* r = Reactor::Current();
  while (own_queue_ && own_queue_->running() > 0) r->RunOnce(true);
  if (own_port_) own_port_->Detach();
  while (shared_->ports() > 0) r->RunOnce(true);
  for (auto& t : threads_) {
    if (t->thread.joinable()) t->thread.join();
  }
  shared_->Stop();
  r->RunUntilIdle();
}

UblkQueues::~UblkQueues() {
  // After a failed start, queue threads that did start wait on fetches that only end with
  // the process (its character device closing): they are left to it.
  for (auto& t : threads_) {
    if (t->thread.joinable()) t->thread.detach();
  }
}

}  // namespace qcow2kit::ublk
