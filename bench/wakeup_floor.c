// The floor under a userspace overlay's latency on this machine: what one cross-process wakeup
// costs. The parent writes 1 byte to pipe A, the child (blocking read, epoll, or spinning) reads
// it and writes to pipe B, the parent reads it: one round trip = 2 wakeups. GAP_US idles between
// rounds (10000 = like `ping -i 0.01`: idle vCPUs halt; 0 = hot). An overlay round trip through
// two agents takes 4 such wakeups more than the kernel's VXLAN, which runs in softirq.
//   gcc -O2 -o /tmp/wakeup_floor bench/wakeup_floor.c
//   /tmp/wakeup_floor ROUNDS GAP_US MODE(pipe|epoll|spin) CPU_PARENT CPU_CHILD   (-1 = unpinned)
//   e.g. /tmp/wakeup_floor 2000 10000 epoll -1 -1
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sched.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/wait.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static void pin(int c){if(c<0)return;cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);sched_setaffinity(0,sizeof s,&s);}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
static void waitread(int fd,const char*mode,int ep){char c;
  if(!strcmp(mode,"spin")){while(read(fd,&c,1)!=1);return;}
  if(!strcmp(mode,"epoll")){struct epoll_event e;while(epoll_wait(ep,&e,1,-1)!=1);}
  while(read(fd,&c,1)!=1);}
int main(int argc,char**argv){
  int n=atoi(argv[1]),gap=atoi(argv[2]);const char*mode=argv[3];int cp=atoi(argv[4]),cc=atoi(argv[5]);
  int a[2],b[2];pipe(a);pipe(b);
  if(!strcmp(mode,"spin")){fcntl(a[0],F_SETFL,O_NONBLOCK);fcntl(b[0],F_SETFL,O_NONBLOCK);}
  pid_t pid=fork();
  if(pid==0){pin(cc);int ep=epoll_create1(0);struct epoll_event e={.events=EPOLLIN};epoll_ctl(ep,EPOLL_CTL_ADD,a[0],&e);
    for(int i=0;i<n;i++){waitread(a[0],mode,ep);char c=1;write(b[1],&c,1);}_exit(0);}
  pin(cp);int ep=epoll_create1(0);struct epoll_event e={.events=EPOLLIN};epoll_ctl(ep,EPOLL_CTL_ADD,b[0],&e);
  double*r=malloc(n*sizeof(double));
  const char*pm=!strcmp(mode,"spin")?"pipe":mode; // parent waits the ordinary way except in spin mode
  for(int i=0;i<n;i++){ if(gap)usleep(gap); double t=now();char c=1;write(a[1],&c,1);waitread(b[0],!strcmp(mode,"spin")?"spin":pm,ep);r[i]=now()-t;}
  waitpid(pid,0,0);qsort(r,n,sizeof(double),cmp);
  printf("%-5s gap=%5dus pin=%d/%d  rtt(2 wakeups) median %.1f us  p10 %.1f  p90 %.1f  -> per wakeup %.1f us\n",mode,gap,cp,cc,r[n/2],r[n/10],r[n*9/10],r[n/2]/2);
}
