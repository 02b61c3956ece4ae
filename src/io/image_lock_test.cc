// Tests of QEMU-compatible image locking. OFD locks belong to the open file description, so two
// open()s of one file in this process conflict exactly as two processes would. The byte sets
// checked are what QEMU 7.2 was seen to lock (/proc/locks) for the same kind of open; the
// integration test tests/test_locking.py checks against QEMU itself.
#include "io/image_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <set>
#include <string>

#include "gtest/gtest.h"
#include "qcow2kit/file.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

constexpr LockPerms kQcow2Read{kPermConsistentRead, kPermWrite | kPermResize};
constexpr LockPerms kQcow2Write{kPermConsistentRead | kPermWrite | kPermResize,
                                kPermWrite | kPermResize};
constexpr LockPerms kRawWrite{kPermConsistentRead | kPermWrite, 0};

// The lock bytes (100..104, 200..204) that some other open file description holds, as seen
// through a fresh descriptor of `path`.
std::set<int> LockedBytes(const std::string& path) {
  std::set<int> out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  for (int base : {100, 200}) {
    for (int byte = base; byte <= base + 4; ++byte) {
      struct flock fl = {};
      fl.l_type = F_WRLCK;
      fl.l_whence = SEEK_SET;
      fl.l_start = byte;
      fl.l_len = 1;
      EXPECT_EQ(::fcntl(fd, F_OFD_GETLK, &fl), 0);
      if (fl.l_type != F_UNLCK) out.insert(byte);
    }
  }
  ::close(fd);
  return out;
}

class ImageLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ / "img";
    int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    ::close(fd);
  }
  // A new open file description of the image, closed at the end of the test.
  int Open() {
    int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    fds_.push_back(fd);
    return fd;
  }
  void TearDown() override {
    for (int fd : fds_) ::close(fd);
  }

  testing::ScratchDir dir_;
  std::string path_;
  std::vector<int> fds_;
};

TEST_F(ImageLockTest, LocksTheBytesQemuLocks) {
  auto writer = ImageLock::Acquire(Open(), path_, kQcow2Write);
  ASSERT_TRUE(writer.ok()) << writer.status().ToString();
  EXPECT_EQ(LockedBytes(path_), (std::set<int>{100, 101, 103, 201, 203}));
  writer->reset();
  EXPECT_EQ(LockedBytes(path_), std::set<int>{});

  auto reader = ImageLock::Acquire(Open(), path_, kQcow2Read);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ(LockedBytes(path_), (std::set<int>{100, 201, 203}));
}

TEST_F(ImageLockTest, ReadersShare) {
  auto a = ImageLock::Acquire(Open(), path_, kQcow2Read);
  auto b = ImageLock::Acquire(Open(), path_, kQcow2Read);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
}

TEST_F(ImageLockTest, ReaderFailsWhileWriterHoldsTheImage) {
  auto writer = ImageLock::Acquire(Open(), path_, kQcow2Write);
  ASSERT_TRUE(writer.ok());
  auto reader = ImageLock::Acquire(Open(), path_, kQcow2Read);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), EAGAIN);
  EXPECT_EQ(
      reader.status().ToString(),
      "Failed to get shared \"write\" lock\nIs another process using the image [" + path_ + "]?");
  // The failed attempt left nothing behind.
  EXPECT_EQ(LockedBytes(path_), (std::set<int>{100, 101, 103, 201, 203}));

  writer->reset();
  auto again = ImageLock::Acquire(Open(), path_, kQcow2Read);
  EXPECT_TRUE(again.ok()) << again.status().ToString();
}

TEST_F(ImageLockTest, WriterFailsWhileReaderHoldsTheImage) {
  auto reader = ImageLock::Acquire(Open(), path_, kQcow2Read);
  ASSERT_TRUE(reader.ok());
  auto writer = ImageLock::Acquire(Open(), path_, kQcow2Write);
  ASSERT_FALSE(writer.ok());
  EXPECT_EQ(writer.status().ToString(),
            "Failed to get \"write\" lock\nIs another process using the image [" + path_ + "]?");
  EXPECT_EQ(LockedBytes(path_), (std::set<int>{100, 201, 203}));
}

TEST_F(ImageLockTest, RawUsersShareWritesButNotWithQcow2) {
  auto a = ImageLock::Acquire(Open(), path_, kRawWrite);
  auto b = ImageLock::Acquire(Open(), path_, kRawWrite);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_FALSE(ImageLock::Acquire(Open(), path_, kQcow2Read).ok());
}

TEST_F(ImageLockTest, LocksLastAsLongAsTheObjectNotTheDescriptor) {
  int fd = Open();
  auto first = ImageLock::Acquire(fd, path_, kQcow2Write);
  ASSERT_TRUE(first.ok());
  // Destroying it drops the locks although the caller's descriptor stays open.
  first->reset();
  EXPECT_EQ(LockedBytes(path_), std::set<int>{});

  auto second = ImageLock::Acquire(fd, path_, kQcow2Write);
  ASSERT_TRUE(second.ok());
  // Closing the caller's descriptor keeps them: the ImageLock has its own.
  ::close(fd);
  fds_.pop_back();
  EXPECT_EQ(LockedBytes(path_), (std::set<int>{100, 101, 103, 201, 203}));
  EXPECT_FALSE(ImageLock::Acquire(Open(), path_, kQcow2Read).ok());
}

// Through the library's entry point: the files OpenImage opens are locked as QEMU locks them.
class OpenImageLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = Reactor::Create(EngineKind::kSync);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(*r);
  }
  Result<std::unique_ptr<FormatDriver>> OpenImg(const std::string& name, bool writable,
                                                bool force_share = false) {
    OpenOptions o;
    o.writable = writable;
    o.force_share = force_share;
    return reactor_->BlockOn(OpenImage(dir_ / name, o));
  }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
};

TEST_F(OpenImageLockTest, SecondOpenConflictsAsInQemu) {
  testing::MustRun("cd " + dir_.path() + " && qemu-img create -q -f qcow2 img.qcow2 1M");
  {
    auto writer = OpenImg("img.qcow2", true);
    ASSERT_TRUE(writer.ok()) << writer.status().ToString();
    EXPECT_EQ(LockedBytes(dir_ / "img.qcow2"), (std::set<int>{100, 101, 103, 201, 203}));
    auto reader = OpenImg("img.qcow2", false);
    ASSERT_FALSE(reader.ok());
    EXPECT_NE(reader.status().ToString().find("Failed to get shared \"write\" lock"),
              std::string::npos)
        << reader.status().ToString();
    auto shared = OpenImg("img.qcow2", false, /*force_share=*/true);
    EXPECT_TRUE(shared.ok()) << shared.status().ToString();
  }
  {
    auto reader = OpenImg("img.qcow2", false);
    ASSERT_TRUE(reader.ok()) << reader.status().ToString();
    auto reader2 = OpenImg("img.qcow2", false);
    EXPECT_TRUE(reader2.ok()) << reader2.status().ToString();
    auto writer = OpenImg("img.qcow2", true);
    ASSERT_FALSE(writer.ok());
    EXPECT_NE(writer.status().ToString().find("Failed to get \"write\" lock"), std::string::npos)
        << writer.status().ToString();
  }
  // Everything closed: nothing left locked.
  EXPECT_EQ(LockedBytes(dir_ / "img.qcow2"), std::set<int>{});
}

TEST_F(OpenImageLockTest, ForceShareIsReadOnlyAndLocksNothing) {
  testing::MustRun("cd " + dir_.path() + " && qemu-img create -q -f qcow2 img.qcow2 1M");
  auto w = OpenImg("img.qcow2", true, /*force_share=*/true);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().ToString(), "force-share=on can only be used with read-only images");
  auto r = OpenImg("img.qcow2", false, /*force_share=*/true);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(LockedBytes(dir_ / "img.qcow2"), std::set<int>{});
}

TEST_F(OpenImageLockTest, BackingAndDataFilesLockAsInQemu) {
  testing::MustRun("cd " + dir_.path() +
                   " && qemu-img create -q -f qcow2 base.qcow2 1M"
                   " && qemu-img create -q -f raw base.raw 1M"
                   " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"
                   " && qemu-img create -q -f qcow2 -b base.raw -F raw top2.qcow2"
                   " && qemu-img create -q -f qcow2 -o data_file=d.data d.qcow2 1M");
  {
    auto top = OpenImg("top.qcow2", true);
    ASSERT_TRUE(top.ok()) << top.status().ToString();
    // A backing file is a read-only qcow2 image: nobody may write it, readers may share it.
    EXPECT_EQ(LockedBytes(dir_ / "base.qcow2"), (std::set<int>{100, 201, 203}));
    EXPECT_FALSE(OpenImg("base.qcow2", true).ok());
    EXPECT_TRUE(OpenImg("base.qcow2", false).ok());
  }
  {
    auto top = OpenImg("top2.qcow2", true);
    ASSERT_TRUE(top.ok()) << top.status().ToString();
    EXPECT_EQ(LockedBytes(dir_ / "base.raw"), std::set<int>{100});
  }
  {
    auto img = OpenImg("d.qcow2", true);
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    // A data file is written through but only resizing is denied to others.
    EXPECT_EQ(LockedBytes(dir_ / "d.data"), (std::set<int>{100, 101, 103, 203}));
    auto again = OpenImg("d.qcow2", false);
    ASSERT_FALSE(again.ok());
  }
  {
    auto img = OpenImg("d.qcow2", false);
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    EXPECT_EQ(LockedBytes(dir_ / "d.data"), (std::set<int>{100, 203}));
  }
}

TEST(LockImageFileTest, ForceShareRefusesWritableFiles) {
  testing::ScratchDir dir;
  auto f = File::Create(dir / "x");
  ASSERT_TRUE(f.ok());
  Status s = LockImageFile(**f, ImageFileRole::kRaw, /*force_share=*/true);
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_TRUE(LockImageFile(**f, ImageFileRole::kRaw, /*force_share=*/false).ok());
  EXPECT_EQ(LockedBytes(dir / "x"), (std::set<int>{100, 101}));
  f->reset();  // closing the file drops its locks
  EXPECT_EQ(LockedBytes(dir / "x"), std::set<int>{});
}

}  // namespace
}  // namespace qcow2kit
