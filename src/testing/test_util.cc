#include "testing/test_util.h"

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>

#include "gtest/gtest.h"

namespace qcow2kit::testing {

ScratchDir::ScratchDir() {
  char tmpl[] = "/tmp/qk_test_XXXXXX";
  path_ = ::mkdtemp(tmpl);
}

ScratchDir::~ScratchDir() {
  std::system(("rm -rf '" + path_ + "'").c_str());
}

int Run(const std::string& cmd, std::string* out) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  int status = ::pclose(p);
  if (out) *out = std::move(text);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void ExpectImageMatchesModel(const ScratchDir& dir, const void* model, size_t size) {
  {
    std::ofstream f(dir / "model.raw", std::ios::binary | std::ios::trunc);
    f.write(static_cast<const char*>(model), static_cast<std::streamsize>(size));
  }
  std::string out;
  int rc = Run("cd " + dir.path() + " && qemu-img check img.qcow2", &out);
  EXPECT_EQ(rc, 0) << out;
  rc = Run("cd " + dir.path() + " && qemu-img compare -f raw -F qcow2 model.raw img.qcow2", &out);
  EXPECT_EQ(rc, 0) << out;
}

void MustRun(const std::string& cmd) {
  std::string out;
  int rc = Run(cmd, &out);
  ASSERT_EQ(rc, 0) << cmd << "\n" << out;
}

std::vector<uint8_t> ReadWholeFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::unique_ptr<Reactor> NewReactor(EngineKind kind) {
  auto r = Reactor::Create(kind);
  if (!r.ok()) {
    std::fprintf(stderr, "cannot create the test's reactor: %s\n", r.status().ToString().c_str());
    std::abort();
  }
  return std::move(*r);
}

}  // namespace qcow2kit::testing
