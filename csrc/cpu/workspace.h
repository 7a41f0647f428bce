// The model-aware core's CPU workspaces: while a core op runs, ATen's CPU allocations of at least
// kWorkspaceMinBytes come from a cache that keeps freed blocks for the next task and inner step
// (and the next call) instead of handing them back to the kernel. Without it, glibc's malloc
// serves such blocks with fresh mmap'ed pages, and every task pays a page fault per 4 KiB of
// activations (pymeta/memory.py measured it); with it the process's malloc settings stay as
// they are.
#pragma once

#include <cstdint>

namespace pymeta {

// Blocks below this size stay with the allocator in place (glibc's heap serves them well).
constexpr int64_t kWorkspaceMinBytes = int64_t{128} << 10;

// While one exists (on any thread), the cache serves CPU allocations. Scopes nest and may overlap
// across threads: the first installs the cache, the last restores the previous allocator.
// Memory allocated inside may be freed anywhere, at any time: it returns to the cache.
class WorkspaceScope {
 public:
  WorkspaceScope();
  ~WorkspaceScope();
  WorkspaceScope(const WorkspaceScope&) = delete;
  WorkspaceScope& operator=(const WorkspaceScope&) = delete;
};

// Bytes of free blocks the cache holds, and the most it keeps (default 64 MiB: about one conv4
// task's activations; beyond it the least recently freed blocks go back to malloc).
// Besides, a miss hands cached blocks back to malloc until cached and live blocks together fit
// under the most the live ones have reached since the last release: the cache reuses memory
// the process held at its peak anyway, and never raises the peak of its own blocks (the
// process's resident peak moves a little: other allocations peak at other times).
// release_workspaces() frees them all and restarts that count.
int64_t workspace_cached_bytes();
int64_t workspace_cache_limit();
void set_workspace_cache_limit(int64_t bytes);
void release_workspaces();

}  // namespace pymeta
