// Session: the transmission phase of one NBD connection. A reader takes requests off the
// socket (many per recv), each request runs as its own task against the shared BlockDevice,
// and a sender gathers finished replies into as few sendmsg calls as possible. Replies go
// out in completion order, matched by handle.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "export/nbd/handshake.h"
#include "export/nbd/protocol.h"
#include "export/nbd/transport.h"
#include "io/wakeup.h"
#include "qcow2kit/block.h"
#include "qcow2kit/buffer.h"

namespace qcow2kit::nbd {

class Session {
 public:
  Session(Transport* transport, InputBuffer* in, const Negotiated& negotiated);
  ~Session();

  // Serves requests until the client disconnects or Stop() is called; returns once every
  // accepted request has finished and its reply was sent (or the socket died).
  Task<void> Run();
  // Stops taking new requests (server shutdown); those in flight still complete.
  void Stop();

 private:
  struct Slot;
  Task<void> Reader();
  Task<void> Sender();
  Task<void> Handle(Slot* slot);
  // Performs the request and builds its reply; an error becomes an error reply.
  Task<Status> Execute(Slot* slot);
  Status Validate(const Request& r) const;
  Task<Status> DoRead(Slot* slot);
  Task<Status> DoWrite(Slot* slot);
  Task<Status> DoWriteZeroes(Slot* slot);
  Task<Status> DoBlockStatus(Slot* slot);
  Slot* TakeSlot();
  void ReleaseSlot(Slot* slot);

  Transport* transport_;
  InputBuffer* in_;
  Negotiated n_;
  BlockDevice* device_;

  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> free_;
  std::vector<Slot*> ready_;  // replies waiting for the sender
  std::vector<Slot*> sending_;
  std::vector<iovec> iov_;
  size_t in_flight_ = 0;     // requests taken and not yet released
  uint64_t bytes_held_ = 0;  // payload bytes of those requests
  bool stopping_ = false;
  bool reader_done_ = false;
  bool sender_done_ = false;
  bool dead_ = false;  // sending failed: replies are dropped
  Wakeup reader_wakeup_;
  Wakeup sender_wakeup_;
  Wakeup run_wakeup_;
};

}  // namespace qcow2kit::nbd
