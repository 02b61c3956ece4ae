#include "export/nbd/export.h"

#include <cerrno>

#include "export/nbd/protocol.h"

namespace qcow2kit::nbd {

uint16_t Export::TransmissionFlags(bool structured_replies) const {
  // As qemu-nbd 7.2 (docs/nbd-design.md §1.4): a read-only export still accepts FLUSH and FUA.
  uint16_t f = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendCache;
  if (read_only) {
    f |= kTxReadOnly;
  } else {
    f |= kTxSendTrim | kTxSendWriteZeroes | kTxSendFastZero;
  }
  if (structured_replies) f |= kTxSendDf;
  if (multi_conn) f |= kTxCanMultiConn;
  return f;
}

const Export* FindExport(const std::vector<Export>& exports, const std::string& name) {
  for (const Export& e : exports) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

uint32_t WireError(int code) {
  switch (code) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
      return kEPERM;
    case ENOMEM:
      return kENOMEM;
    case EINVAL:
      return kEINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return kENOSPC;
    case EOVERFLOW:
      return kEOVERFLOW;
    case ENOTSUP:
      return kENOTSUP;
    case ESHUTDOWN:
      return kESHUTDOWN;
    default:
      return kEIO;
  }
}

}  // namespace qcow2kit::nbd
